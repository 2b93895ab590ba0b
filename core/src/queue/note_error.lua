-- Note a retried failure. KEYS: job hash, events. ARGV: now, event JSON, maxlen, error.
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
redis.call('HSET', KEYS[1], 'last_error', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'at', ARGV[1], 'e', ARGV[2])
return 1
