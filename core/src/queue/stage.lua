-- Stage one chunk of a big submit: its tasks go to per-lane staging lists of a job that does not
-- exist yet (no record, no index, not in any ring), which expire on their own. The commit
-- (`submit.lua`) adopts them; a coordinator that dies before the commit leaves nothing a user or a
-- worker can see. KEYS: job hash (only for the slot). ARGV: job id, ttl s, task sections (count,
-- then per section: lane, n, n entries). Returns the tasks staged.
local i = 3
local nsec = tonumber(ARGV[i])
i = i + 1
local staged = 0
for _ = 1, nsec do
  local lane, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  if n > 0 then
    local sk = 'pf:job:{' .. ARGV[1] .. '}:stage:' .. lane
    local j = i
    while j < i + n do
      local e = math.min(j + 999, i + n - 1)
      redis.call('RPUSH', sk, unpack(ARGV, j, e))
      j = e + 1
    end
    redis.call('EXPIRE', sk, ARGV[2])
    staged = staged + n
  end
  i = i + n
end
return staged
