-- Shared Lua functions, prepended to the scripts that move tasks between backlogs and lanes.
-- Key layout and invariants: see `crate::fair`.
local function pf_dec(key, field, n)
  if redis.call('HINCRBY', key, field, -n) < 0 then redis.call('HSET', key, field, 0) end
end

-- Removes a job's backlog in one lane (cancel, or a job that vanished) and its ring entries.
local function pf_drop_backlog(job, tenant, lane)
  local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
  local n = redis.call('LLEN', bl)
  if n == 0 then return 0 end
  redis.call('DEL', bl)
  local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
  redis.call('LREM', tq, 0, job)
  pf_dec('pf:tenant:' .. tenant, 'queued', n)
  pf_dec('pf:fair:backlog', lane, n)
  if redis.call('LLEN', tq) == 0 then
    redis.call('LREM', 'pf:fair:' .. lane .. ':ring', 0, tenant)
    redis.call('HDEL', 'pf:fair:' .. lane .. ':deficit', tenant)
    if redis.call('GET', 'pf:fair:' .. lane .. ':turn') == tenant then
      redis.call('DEL', 'pf:fair:' .. lane .. ':turn')
    end
  end
  return n
end

-- Deficit round robin: moves backlog tasks of `lane` (e.g. 'normal:base') into its stream until
-- the stream holds `target` undelivered entries. The ring's head tenant has the turn; a turn
-- adds `quantum` to its deficit once (the `turn` key remembers a turn cut short by a full
-- stream); each moved task costs 1. A tenant at its in-flight limit is passed over (and loses
-- its credit); a tenant whose backlog runs dry leaves the ring. Returns the tasks moved.
local function pf_refill(lane, target, quantum)
  local ring = 'pf:fair:' .. lane .. ':ring'
  local nring = redis.call('LLEN', ring)
  if nring == 0 then return 0 end
  local stream = 'pf:lane:' .. lane
  local pending = 0
  local p = redis.pcall('XPENDING', stream, 'workers')
  if type(p) == 'table' and p[1] then pending = tonumber(p[1]) or 0 end
  local room = target - (redis.call('XLEN', stream) - pending)
  if room <= 0 then return 0 end
  local dkey = 'pf:fair:' .. lane .. ':deficit'
  local turnkey = 'pf:fair:' .. lane .. ':turn'
  local moved, idle, guard = 0, 0, 0
  while room > 0 and guard < 100000 do
    guard = guard + 1
    local tenant = redis.call('LINDEX', ring, 0)
    if not tenant then break end
    local tkey = 'pf:tenant:' .. tenant
    local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
    local deficit = tonumber(redis.call('HGET', dkey, tenant)) or 0
    if redis.call('GET', turnkey) ~= tenant then
      deficit = deficit + quantum
      redis.call('SET', turnkey, tenant)
    end
    local lim = redis.call('HMGET', tkey, 'in_flight', 'max_in_flight')
    local inflight, maxif = tonumber(lim[1]) or 0, tonumber(lim[2]) or 0
    local sent, blocked = 0, false
    while deficit >= 1 and room > 0 do
      if maxif > 0 and inflight >= maxif then blocked = true break end
      local job = redis.call('LINDEX', tq, 0)
      if not job then break end
      local st = redis.call('HGET', 'pf:job:{' .. job .. '}', 'state')
      if (not st) or st == 'CANCELED' then
        if pf_drop_backlog(job, tenant, lane) == 0 then redis.call('LREM', tq, 0, job) end
        if redis.call('LLEN', tq) == 0 then break end
      else
        local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
        local t = redis.call('LPOP', bl)
        if redis.call('LLEN', bl) == 0 then redis.call('LPOP', tq) end
        if t then
          local sp = string.find(t, ' ', 1, true)
          redis.call('XADD', stream, '*', 't', string.sub(t, sp + 1), 'l', string.sub(t, 1, sp - 1), 'n', tenant)
          inflight = inflight + 1
          deficit = deficit - 1
          room = room - 1
          moved = moved + 1
          sent = sent + 1
        end
      end
    end
    if sent > 0 then
      redis.call('HINCRBY', tkey, 'in_flight', sent)
      pf_dec('pf:fair:backlog', lane, sent)
      idle = 0
    elseif blocked then
      idle = idle + 1
    end
    if redis.call('LLEN', tq) == 0 then
      -- The tenant has nothing left here (a cancel may already have removed it from the ring).
      if redis.call('LINDEX', ring, 0) == tenant then redis.call('LPOP', ring) end
      redis.call('HDEL', dkey, tenant)
      redis.call('DEL', turnkey)
    elseif blocked or deficit < 1 then
      if blocked then deficit = 0 end
      redis.call('HSET', dkey, tenant, deficit)
      redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      redis.call('DEL', turnkey)
    else
      redis.call('HSET', dkey, tenant, deficit)
    end
    if idle > 0 and idle >= redis.call('LLEN', ring) then break end
  end
  return moved
end

-- Appends the task sections starting at ARGV[start] (count, then per section: lane, n, n entries)
-- to the job's backlogs, registers job and tenant for refill, counts them as queued, refills.
local function pf_push(job, tenant, start, target, quantum)
  local i = start
  local nsec = tonumber(ARGV[i])
  i = i + 1
  local moved = 0
  for _ = 1, nsec do
    local lane, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if n > 0 then
      local bl = 'pf:job:{' .. job .. '}:backlog:' .. lane
      local was = redis.call('LLEN', bl)
      local j = i
      while j < i + n do
        local e = math.min(j + 999, i + n - 1)
        redis.call('RPUSH', bl, unpack(ARGV, j, e))
        j = e + 1
      end
      if was == 0 then
        local tq = 'pf:fair:' .. lane .. ':t:' .. tenant
        redis.call('RPUSH', tq, job)
        if redis.call('LLEN', tq) == 1 then
          redis.call('RPUSH', 'pf:fair:' .. lane .. ':ring', tenant)
        end
      end
      redis.call('HINCRBY', 'pf:tenant:' .. tenant, 'queued', n)
      redis.call('HINCRBY', 'pf:fair:backlog', lane, n)
      moved = moved + pf_refill(lane, target, quantum)
    end
    i = i + n
  end
  return moved
end

local function pf_hset_range(key, first, last)
  local j = first
  while j < last do
    local e = math.min(j + 999, last)
    redis.call('HSET', key, unpack(ARGV, j, e))
    j = e + 1
  end
end
