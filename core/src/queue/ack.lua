-- Acknowledge and delete entries (they are done; deleting keeps streams short), release their
-- tenant's counters (only when `XACK` says the entry was still pending, so a racing second
-- acknowledgement releases nothing), then refill the lane. KEYS: lane.
-- ARGV: group, lane name, stream target, quantum, ids…
local n = 0
for i = 5, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if acked == 1 and #e == 1 then
    local f = e[1][2]
    for j = 1, #f, 2 do
      if f[j] == 'n' then
        local tk = 'pf:tenant:' .. f[j + 1]
        pf_dec(tk, 'in_flight', 1)
        pf_dec(tk, 'queued', 1)
      end
    end
  end
  n = n + acked
  redis.call('XDEL', KEYS[1], ARGV[i])
end
pf_refill(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return n
