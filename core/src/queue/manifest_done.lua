-- A manifest was stored: note its key and clear the job's manifest-due marker, unless the job was
-- marked again after the writer read it (a late success replaced a failure meanwhile), in which
-- case the marker stays and the next sweep writes the manifest again.
-- KEYS: job hash, manifest-due zset. ARGV: job id, manifest key, marker score read before the
-- results ('' = there was none).
redis.call('HSET', KEYS[1], 'manifest_key', ARGV[2])
local now = redis.call('ZSCORE', KEYS[2], ARGV[1])
if now and (ARGV[3] == '' or tonumber(now) <= tonumber(ARGV[3])) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
