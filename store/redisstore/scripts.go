package redisstore

import "github.com/redis/go-redis/v9"

// Every change of a job is one Lua script, so that Redis applies it whole or not at all and no
// other instance sees half of it. The scripts build key names from the prefix (ARGV[1]): the
// store targets one Redis server (or a replicated primary), not Redis Cluster, whose scripts
// must name every key up front.

// luaPrelude is shared by the scripts that append to a job's stream after its creation, take a
// job out of the listings or end a job.
const luaPrelude = `
-- tellOwner tells the instance running a job that another one ended it, on that instance's
-- control stream, which its reader follows: it stops the job's upstream request.
local function tellOwner(P, inst, writer, id)
	if inst and inst ~= writer then
		local ctl = P .. 'ctl:' .. inst
		redis.call('XADD', ctl, 'MAXLEN', '~', 1000, '*', 'id', id)
		redis.call('PEXPIRE', ctl, 86400000)
	end
end
-- announce names, on the changes stream that every instance's reader follows, a job whose
-- stream got an entry: seq, or 'x' for a tombstone. n numbers the entries one by one, so that a
-- reader can tell that entries it had not read yet were trimmed. An event whose document is
-- at most 2,048 bytes (a progress report's, as a rule) rides along (kind k, document d): a
-- reader that has published the seq before it publishes the event as it is, with no read of
-- the job's stream. The stream keeps about the newest 20,000 entries (a progress document is
-- some 600 bytes: 12 MB, 41 MB at most): a reader falls that far behind only if it stops for
-- 20 s at 1,000 events a second, and then it reads every stream it follows again (one XRANGE
-- per followed job). Both keys live a day after the last event, like the control streams.
local function announce(P, id, seq, kind, doc)
	local ch = P .. 'changes'
	local n = redis.call('INCR', ch .. ':n')
	if doc and #doc <= 2048 then
		redis.call('XADD', ch, 'MAXLEN', '~', 20000, '*', 'j', id, 's', seq, 'n', n, 'k', kind, 'd', doc)
	else
		redis.call('XADD', ch, 'MAXLEN', '~', 20000, '*', 'j', id, 's', seq, 'n', n)
	end
	redis.call('PEXPIRE', ch, 86400000)
	redis.call('PEXPIRE', ch .. ':n', 86400000)
end
local states = {'queued', 'running', 'succeeded', 'failed', 'canceled'}
local function unindex(P, member, owner)
	local own = P .. 'own:' .. owner
	redis.call('ZREM', own, member)
	redis.call('ZREM', P .. 'all', member)
	for _, st in ipairs(states) do
		redis.call('ZREM', own .. ':' .. st, member)
		redis.call('ZREM', P .. 'all:' .. st, member)
	end
end
`

// createScript makes a job, or returns the id of the owner's job made with the same
// Idempotency-Key. Its first event is not announced on the changes stream: an instance follows
// a job only after reading it, so it never waits for that event. ARGV: prefix, id, record,
// event kind, document, listing member, instance, idempotency index ("" for none), state,
// owner hash, write mark (see updateScript). Returns "" when it made the job.
var createScript = redis.NewScript(`
local P, id, idem = ARGV[1], ARGV[2], ARGV[8]
if idem ~= '' then
	local existing = redis.call('GET', P .. 'idem:' .. idem)
	if existing then return existing end
end
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 1 then return redis.error_reply('job id already in use') end
redis.call('HSET', job, 'rec', ARGV[3], 'seq', '1', 'inst', ARGV[7], 'w', ARGV[11])
redis.call('XADD', P .. 'ev:' .. id, '1-0', 'k', ARGV[4], 'd', ARGV[5])
if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, id) end
local own = P .. 'own:' .. ARGV[10]
redis.call('ZADD', own, 0, ARGV[6])
redis.call('ZADD', own .. ':' .. ARGV[9], 0, ARGV[6])
redis.call('ZADD', P .. 'all', 0, ARGV[6])
redis.call('ZADD', P .. 'all:' .. ARGV[9], 0, ARGV[6])
redis.call('SADD', P .. 'active:' .. ARGV[7], id)
redis.call('SADD', P .. 'instances', ARGV[7])
return ''
`)

// updateScript stores the next version of a job if the job is still at the seq the version was
// made from (compare and set: the seq stays contiguous however many instances write). ARGV:
// prefix, id, expected seq, record, event kind, document, listing member, owner hash, previous
// state, new state, terminal ("1" or ""), retention in ms, expiry time in ms, events kept,
// idempotency index, result head ("" for none), result spool key ("" for none), the writing
// instance, the expected write mark ("" for none), the new write mark. Returns 1 when stored,
// 0 when another write came first, -1 when the job is gone, -2 when the spool is gone.
//
// A write mark names the write that made the stored version (instance and a counter). An
// instance that changes a job from the version it wrote itself, without reading it (see
// recent.go), expects its mark as well as the seq: after Redis lost acknowledged writes (a
// crash under appendfsync everysec), another instance may have stored a different version
// under the same seq.
var updateScript = redis.NewScript(luaPrelude + `
local P, id = ARGV[1], ARGV[2]
local job = P .. 'job:' .. id
local seq = redis.call('HGET', job, 'seq')
if not seq then return -1 end
if seq ~= ARGV[3] then return 0 end
if ARGV[19] ~= '' and redis.call('HGET', job, 'w') ~= ARGV[19] then return 0 end
local spool = ARGV[17]
if spool ~= '' and redis.call('EXISTS', spool) == 0 then return -2 end
local new = tostring(tonumber(seq) + 1)
local ev = P .. 'ev:' .. id
redis.call('HSET', job, 'rec', ARGV[4], 'seq', new, 'w', ARGV[20])
redis.call('XADD', ev, 'MAXLEN', ARGV[14], new .. '-0', 'k', ARGV[5], 'd', ARGV[6])
announce(P, id, new, ARGV[5], ARGV[6])
if ARGV[9] ~= ARGV[10] then
	local own = P .. 'own:' .. ARGV[8]
	redis.call('ZREM', own .. ':' .. ARGV[9], ARGV[7])
	redis.call('ZADD', own .. ':' .. ARGV[10], 0, ARGV[7])
	redis.call('ZREM', P .. 'all:' .. ARGV[9], ARGV[7])
	redis.call('ZADD', P .. 'all:' .. ARGV[10], 0, ARGV[7])
end
local body = P .. 'body:' .. id
if ARGV[16] ~= '' then redis.call('HSET', job, 'res', ARGV[16]) end
if spool ~= '' then redis.call('RENAME', spool, body) end
if ARGV[11] == '1' then
	local inst = redis.call('HGET', job, 'inst')
	if inst then redis.call('SREM', P .. 'active:' .. inst, id) end
	tellOwner(P, inst, ARGV[18], id)
	redis.call('ZADD', P .. 'expiry', ARGV[13], ARGV[7] .. '|' .. ARGV[8])
	redis.call('PEXPIRE', job, ARGV[12])
	redis.call('PEXPIRE', ev, ARGV[12])
	redis.call('PEXPIRE', body, ARGV[12])
	if ARGV[15] ~= '' then redis.call('PEXPIRE', P .. 'idem:' .. ARGV[15], ARGV[12]) end
end
return 1
`)

// deleteScript forgets a job and leaves a tombstone in its event stream, so that the instances
// following the stream end their subscribers with "not found". ARGV: prefix, id, listing
// member, owner hash, idempotency index, tombstone lifetime in ms, the writing instance.
// Returns 0 if there was no such job.
var deleteScript = redis.NewScript(luaPrelude + `
local P, id, member, owner, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local job = P .. 'job:' .. id
if redis.call('EXISTS', job) == 0 then return 0 end
local inst = redis.call('HGET', job, 'inst')
if inst and redis.call('SREM', P .. 'active:' .. inst, id) == 1 then
	tellOwner(P, inst, ARGV[7], id)
end
redis.call('DEL', job, P .. 'body:' .. id)
unindex(P, member, owner)
redis.call('ZREM', P .. 'expiry', member .. '|' .. owner)
if idem ~= '' and redis.call('GET', P .. 'idem:' .. idem) == id then
	redis.call('DEL', P .. 'idem:' .. idem)
end
local ev = P .. 'ev:' .. id
redis.call('XADD', ev, '*', 'k', 'x')
announce(P, id, 'x')
redis.call('PEXPIRE', ev, ARGV[6])
return 1
`)

// sweepScript takes finished jobs whose retention has ended out of the listings (their keys
// expire by themselves). ARGV: prefix, now in ms, batch size. Returns how many it took out.
var sweepScript = redis.NewScript(luaPrelude + `
local P = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, entry in ipairs(due) do
	local member, owner = string.match(entry, '^([^|]*)|(.*)$')
	if member then unindex(P, member, owner) end
	redis.call('ZREM', P .. 'expiry', entry)
end
return #due
`)
