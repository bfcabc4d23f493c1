-- publish: store new messages and make them pending (or delayed).
-- KEYS[1] msg        HASH  id -> envelope
-- KEYS[2] pending    LIST  ids ready to run
-- KEYS[3] delayed    ZSET  id -> due time (ms, Redis clock)
-- KEYS[4] wake       LIST  wake-up token for blocked workers
-- KEYS[5] stats      HASH  counters
-- KEYS[6] processed  ZSET  ledger of recently processed ids (deduplicating workers)
-- KEYS[7] minutes    HASH  per-minute counters (see count_minute)
-- KEYS[8] uniq       HASH  id -> unique key it holds until its final state
-- KEYS[9] meta       HASH  the topic's layout: partitions (absent = 1), frozen (until when)
-- KEYS[10] ready     ZSET  id -> when it became ready (ms), for entries pushed at the head
-- KEYS[11] runs      LIST  "<count> <ms>": runs of tail entries by when they became ready
-- KEYS[12..] unique-key STRINGs (id of the message that holds the key), as referenced below
-- ARGV[1] the number of partitions the caller believes the topic has (1: a plain topic).
--         Another number in meta means the caller's layout is out of date: nothing is
--         written and the reply is the error `PARTITIONED <n>` (the caller re-reads it);
--         a frozen layout (being changed) is `TRYAGAIN`.
-- ARGV    then groups of 3: id, envelope, options; options is '' for a message to run now
--         without a unique key (the common case: nothing to convert), else
--         '<delay_ms>,<unique_key_index>,<unique_ttl_ms>,<until_final>' (delay 0 = now;
--         index 0 = no unique key, else an index into KEYS; until_final 1 = the key is
--         released when the message reaches a final state, 0 = it holds for its ttl)
-- Returns one value per message: 1 written; 0 an envelope with that id already exists or
-- the id was processed recently (a retried publish, or a caller-chosen id used twice); or
-- the id (a string) of the message that holds its unique key. Nothing is written for a
-- message that is not new.

local now, now_up = clock()
local refused = check_layout(KEYS[9], ARGV[1], now)
if refused then
  return refused
end
return store_messages(KEYS, ARGV, 2, now, now_up)
