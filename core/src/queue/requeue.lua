-- Re-enqueue a failed task for another attempt, if the caller still owns it. The new entry keeps
-- the old one's tenant field, so the tenant's counters need no change. KEYS: lane.
-- ARGV: group, consumer, id, task JSON, lease ms. Returns the new entry id or false.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return false end
local nid
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
local tenant = nil
if #e == 1 then
  local f = e[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'n' then tenant = f[j + 1] end
  end
end
if tenant then
  nid = redis.call('XADD', KEYS[1], '*', 't', ARGV[4], 'l', ARGV[5], 'n', tenant)
else
  nid = redis.call('XADD', KEYS[1], '*', 't', ARGV[4], 'l', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return nid
