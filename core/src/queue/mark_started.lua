-- QUEUED → RUNNING on first pickup. KEYS: job hash, events. ARGV: now, event JSON, maxlen.
if redis.call('HGET', KEYS[1], 'state') == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_ms', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'at', ARGV[1], 'e', ARGV[2])
  return 1
end
return 0
