-- Owner-checked lease extension. KEYS: lane. ARGV: group, consumer, ids…
-- Returns one 1/0 per id: 1 when the caller still owned it and its idle time was reset.
local res = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
