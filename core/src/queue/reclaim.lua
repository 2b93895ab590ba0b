-- Take over expired deliveries of one lane. KEYS: lane. ARGV: group, consumer, min idle ms (the
-- smallest lease), scan count, max to claim.
-- Returns `{{id, deliveries, {field, value, …}}, …}`. An entry is claimed only when it has been
-- idle (no delivery, no heartbeat) for at least its own lease (field `l`).
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local out = {}
local max = tonumber(ARGV[5])
for _, p in ipairs(pend) do
  if #out >= max then break end
  local id, idle, deliveries = p[1], tonumber(p[3]), tonumber(p[4])
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], id)
  else
    local fields = e[1][2]
    local lease = tonumber(ARGV[3])
    for i = 1, #fields, 2 do
      if fields[i] == 'l' then lease = tonumber(fields[i + 1]) end
    end
    if idle >= lease then
      local c = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], lease, id)
      if #c > 0 and c[1] then
        out[#out + 1] = {id, deliveries + 1, c[1][2]}
      end
    end
  end
end
return out
