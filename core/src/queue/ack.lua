-- Acknowledge and delete entries (they are done; deleting keeps streams short), release their
-- tenant's counters, then refill the lane. KEYS: lane.
-- The counters are released when the entry still exists, whatever `XACK` answers: the entry is
-- deleted in the same step, so a racing second acknowledgement finds nothing and releases nothing,
-- while an entry whose delivery Redis forgot (it lost its last writes: AOF `everysec`, a promoted
-- replica) answers `XACK = 0` and must still give its tenant's counts back.
-- ARGV: group, lane name, stream target, quantum, ids…
local n = 0
for i = 5, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if #e == 1 then
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
