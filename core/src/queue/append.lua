-- A further chunk of a big submit. Nothing is added to a job cancelled (or gone) meanwhile.
-- KEYS: job hash. ARGV: job id, tenant, stream target, quantum, task sections.
-- Returns the tasks refill moved, or -1 for a cancelled job.
local st = redis.call('HGET', KEYS[1], 'state')
if (not st) or st == 'CANCELED' then return -1 end
return pf_push(ARGV[1], ARGV[2], 5, tonumber(ARGV[3]), tonumber(ARGV[4]))
