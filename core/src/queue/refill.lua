-- Refill lanes before a pull (a no-op when their streams are full). KEYS: none (the lane keys are
-- derived, see the cluster note in `crate::fair`). ARGV: stream target, quantum, lane names….
local moved = 0
for i = 3, #ARGV do
  moved = moved + pf_refill(ARGV[i], tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return moved
