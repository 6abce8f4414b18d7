/*
** store.h: the durable log's internal interface: the writer lock on a
** file (storelock.c), WAL checkpoints (storewal.c), the store itself
** (store.c, storeopen.c, storeread.c) and its id reservation (ids.c).
** The files that use a store include it; the rest of the core (match,
** queue, bus, loop, dedup) does not know the store exists. The same
** rules as buzz.h's: 0 or a negative BUZZ_E* code, buzz__ names.
*/
#ifndef BUZZ_STORE_H
#define BUZZ_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "buzz.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

/* ------------------------------------------------------------ storelock.c */

/*
** A database file some store of this process has open, known by its
** device and inode; its one descriptor carries the writer's flock.
** CONSTRUCTOR: buzz__file_claim()   DESTRUCTOR: buzz__file_release()
*/
typedef struct buzz_file buzz_file;

/*
** Claims path for a store: opens it (a writer creates it) unless a store of
** this process has it open already, and for a writer takes the writer lock
** on the file itself, so that every path to one file meets the same lock.
** *real gets the canonical path (malloc'd, the caller frees it) to give
** SQLite. On failure returns BUZZ_ELOCKED, BUZZ_ESTORE or BUZZ_ENOMEM with a
** sentence in err, and *out and *real are NULL.
*/
int buzz__file_claim(const char *path, int is_writer, buzz_file **out,
                     char **real, char *err, size_t errlen);
/* Gives the claim back (is_writer as claimed). Call it only once the
** store's SQLite connections are closed: it may close the descriptor,
** which drops the process's POSIX locks on the file. NULL: nothing. */
void buzz__file_release(buzz_file *f, int is_writer);

/* ------------------------------------------------------------- storewal.c */

/*
** A store's checkpointer: a thread and a connection of its own that keep
** the WAL short, off the writer's commits (see storewal.c).
** CONSTRUCTOR: buzz__wal_start()   DESTRUCTOR: buzz__wal_stop()
*/
typedef struct buzz_wal buzz_wal;
struct sqlite3;

/* Starts checkpointing the database file (in WAL mode) that the writer
** connection wdb has open; hooks wdb's commits. BUZZ_ESTORE on failure. */
int buzz__wal_start(buzz_wal **out, struct sqlite3 *wdb, const char *file);
/* Stops and frees it; call it while wdb is open and idle. NULL: nothing. */
void buzz__wal_stop(buzz_wal *w);
int64_t buzz__wal_checkpoints(buzz_wal *w);   /* checkpoints run so far */
/* On the writer thread, between groups: copies the frames a checkpoint
** could not (commits went on meanwhile), so the next commit rewinds the
** WAL. Cheap: the checkpointer did the bulk. */
void buzz__wal_catch_up(buzz_wal *w);

/* ---------------------------------------------------------------- store.c */

/*
** The durable log: one SQLite file in WAL mode, written by a writer thread
** of its own (group commit) and read on the loop thread through a second,
** read-only connection. Rows travel to the writer as buzz_row records.
** Besides events and consumer positions, it keeps a generic key/value
** table "state" (kind, name -> value) for the Lua layer's own records
** (retries, dead letters, delayed events); buzz versions that predate it
** ignore it.
*/
typedef struct buzz_store buzz_store;

enum { BUZZ_DUR_NONE = 0, BUZZ_DUR_BATCH, BUZZ_DUR_SYNC };
enum {
  BUZZ_ROW_EVENT = 0, BUZZ_ROW_ACK, BUZZ_ROW_DROP_CONSUMER,
  BUZZ_ROW_STATE_PUT, BUZZ_ROW_STATE_DEL,
  BUZZ_ROW_IDS_RESERVE, BUZZ_ROW_IDS_RELEASE   /* ids.c; the value in id */
};
/* The store's own rows, which its counters (buzz_store_stats) leave out. */
#define BUZZ_ROW_IS_IDS(kind) \
  ((kind) == BUZZ_ROW_IDS_RESERVE || (kind) == BUZZ_ROW_IDS_RELEASE)

/* A byte string that may be absent (p == NULL). */
typedef struct buzz_str {
  const char *p;
  size_t n;
} buzz_str;

/*
** One record for the writer: an event to append, or a consumer position to
** save (name in type, pattern in key, position in id), or a consumer to
** forget (name in type), or a state row to put (kind in type, name in
** key, value in payload) or delete (kind in type, name in key; key.p NULL
** deletes every row of the kind). The strings live in the same malloc'd
** block as the record.
** CONSTRUCTOR: buzz__row_new()   DESTRUCTOR: free(), by the writer once
** written (the store owns a row from buzz__store_append() on).
*/
typedef struct buzz_row {
  struct buzz_row *next;   /* link; owned by the store's queue */
  int kind;                /* BUZZ_ROW_* */
  int64_t id, ts, causation_id, key_int;
  int priority, version;
  unsigned is_key_int : 1; /* key is the integer key_int, not a string */
  buzz_str type, key, corr, headers, payload, dedup;
  buzz_str stream;         /* an event's stream, with stream_version > 0 */
  int64_t stream_version;
} buzz_row;

/* Copies spec's strings into one block with the record. NULL: no memory. */
buzz_row *buzz__row_new(const buzz_row *spec);

typedef void (*buzz_store_notify_cb)(void *data);

/* Bytes of rows the writer may hold (queued and in flight): the default,
** and the range of buzz.new{ max_backlog = ... }. */
#define BUZZ_BACKLOG_DEFAULT ((int64_t)64 << 20)
#define BUZZ_BACKLOG_MIN ((int64_t)64 << 10)
#define BUZZ_BACKLOG_LIMIT ((int64_t)1 << 48)

typedef struct buzz_store_opts {
  int durability;          /* BUZZ_DUR_* */
  int is_readonly;         /* read only: no writer, no lock */
  int64_t max_bytes;       /* 0 = no cap on the file and its WAL */
  int64_t max_backlog;     /* bytes; 0 = BUZZ_BACKLOG_DEFAULT */
  int64_t max_age_ms;      /* retention; 0 = keep forever */
  int64_t max_events;      /* retention; 0 = no limit */
  buzz_store_notify_cb notify;  /* called on the writer thread after each
                                   commit; must be thread-safe */
  void *data;              /* for notify */
} buzz_store_opts;

/* A stored event as read back; strings borrow the read statement's memory
** and are valid until the next read call. */
typedef struct buzz_stored {
  int64_t id, ts, causation_id, key_int;
  int priority, version;
  int key_kind;            /* 0 none, 1 string, 2 integer */
  buzz_str type, key, corr, headers, payload;
  buzz_str stream;         /* p NULL: the event is in no stream */
  int64_t stream_version;
} buzz_stored;

/* A query over stored events; zero fields are unset. Rows come in id
** order, only committed ones. */
typedef struct buzz_query {
  int64_t after_id;        /* id > after_id */
  int64_t to_id;           /* id <= to_id (0 = no bound) */
  int64_t from_ts, to_ts;  /* ts bounds in ms (0 = none) */
  buzz_str pattern;        /* subject pattern; p NULL = every type */
  buzz_str key;            /* string key (or is_key_int) */
  int64_t key_int;
  int has_key, is_key_int;
  int64_t limit;           /* rows in this page, > 0 */
} buzz_query;

/* The upper bounds (microseconds) of the commit latency histogram's
** buckets; one more bucket counts the rest (+Inf). */
#define BUZZ_COMMIT_BUCKETS 13
#define BUZZ_COMMIT_BOUNDS_US { 100, 250, 500, 1000, 2500, 5000, 10000, \
                                25000, 50000, 100000, 250000, 500000, \
                                1000000 }

typedef struct buzz_store_stats {
  int64_t appended, committed, commits, failed, pending;
  int64_t committed_id, held_back, deleted;
  int64_t backlog_bytes;   /* rows the writer holds now, in bytes */
  int64_t backlog_peak;    /* the most it ever held */
  int64_t backlog_limit;   /* max_backlog */
  int64_t refused;         /* events refused with BUZZ_EFULL */
  int64_t checkpoints;     /* WAL checkpoints run off the writer */
  int64_t commit_le[BUZZ_COMMIT_BUCKETS + 1];  /* commits by latency (not
                              cumulative; the last: beyond every bound) */
  int64_t commit_us;       /* the sum of their latencies, microseconds */
} buzz_store_stats;

/*
** Opens (creating if needed) the store at path. On failure returns
** BUZZ_ESTORE or BUZZ_ELOCKED with a sentence in err, and *out is NULL.
*/
int buzz__store_open(buzz_store **out, const char *path,
                     const buzz_store_opts *o, char *err, size_t errlen);
/* Commits what is queued, stops the writer and closes. Idempotent on NULL. */
void buzz__store_close(buzz_store *s);
/* The highest id at open: for a writer, the highest any earlier session
** may have handed out (its reservation included; see ids.c). */
int64_t buzz__store_last_id(const buzz_store *s);
/*
** Hands a row to the writer; the store owns it from here, even on failure
** (BUZZ_ESTORE: the store was opened read-only). Never blocks: an event
** row that would take the writer's backlog (rows queued or in flight)
** past max_backlog bytes, or past its row limit, is refused with
** BUZZ_EFULL, unless the backlog is empty (so any one row can go). Other
** rows (positions, state) are always taken; they count toward the bound.
*/
int buzz__store_append(buzz_store *s, buzz_row *row);
/* Waits until everything appended so far is committed or has failed. */
void buzz__store_flush(buzz_store *s);
/*
** Reads the committed id and hands every unreported failed group to cb
** (message, lowest and highest event id lost, 0 if none), under one lock:
** an event of a failed group is never taken for committed by a caller
** that drops what cb reports. cb must not call back into the store.
** Returns the number of failures handed over.
*/
typedef void (*buzz_fail_cb)(void *data, const char *msg, int64_t lo,
                             int64_t hi);
int buzz__store_poll(buzz_store *s, int64_t *committed, buzz_fail_cb cb,
                     void *data);
int64_t buzz__store_committed(buzz_store *s);     /* highest committed id */
int buzz__store_is_idle(buzz_store *s);           /* nothing in flight */
void buzz__store_stats(buzz_store *s, buzz_store_stats *st);

/* Reads (loop thread only). Each returns 0 or BUZZ_ESTORE with err. */
int buzz__store_query(buzz_store *s, const buzz_query *q);
/* Ends a page early, releasing the read snapshot. */
void buzz__store_query_done(buzz_store *s);
/* 1 and *row filled, 0 when the page is done, or BUZZ_ESTORE. */
int buzz__store_next(buzz_store *s, buzz_stored *row, char *err,
                     size_t errlen);
/* A consumer's saved position: 1 found, 0 not found, or BUZZ_ESTORE. */
int buzz__store_consumer(buzz_store *s, const char *name, size_t len,
                         int64_t *acked, char *err, size_t errlen);
/* Calls cb for each consumer (name, pattern, acked), in name order. */
typedef void (*buzz_consumer_cb)(void *data, buzz_str name, buzz_str pattern,
                                 int64_t acked, int64_t updated);
int buzz__store_consumers(buzz_store *s, buzz_consumer_cb cb, void *data,
                          char *err, size_t errlen);
/* Calls cb for each type and its count, in type order. */
typedef void (*buzz_count_cb)(void *data, buzz_str type, int64_t n);
int buzz__store_types(buzz_store *s, buzz_count_cb cb, void *data,
                      char *err, size_t errlen);
/* The highest stream_version stored for stream (0: none): an index
** lookup (events_stream). Committed events only. */
int buzz__store_stream_version(buzz_store *s, buzz_str stream, int64_t *v,
                               char *err, size_t errlen);
/* Counts events after id whose type matches pattern (NULL: any). */
int buzz__store_count(buzz_store *s, int64_t after, buzz_str pattern,
                      int64_t *n, char *err, size_t errlen);
/* Counts events, first and last id, bytes on disk (the database and its
** WAL) and the WAL's share of them. With count NULL the events are not
** counted (a pass over the log): the ids are two index lookups. */
int buzz__store_size(buzz_store *s, int64_t *count, int64_t *first,
                     int64_t *last, int64_t *bytes, int64_t *wal_bytes,
                     char *err, size_t errlen);
/* Calls cb(key, id, ts) for events with a dedup key and ts >= since, in
** ts order (then key, then id): one range of the index events_dedup_ts,
** so an open reads only the keys of the window, never the log. */
typedef void (*buzz_dedup_cb)(void *data, buzz_str key, int64_t id,
                              int64_t ts);
int buzz__store_dedup_load(buzz_store *s, int64_t since, buzz_dedup_cb cb,
                           void *data, char *err, size_t errlen);

/*
** Calls cb(data, name, value) for each state row of kind, in name order;
** with name.p set, for the one row (kind, name) if there is one (a
** lookup by the table's key, not a walk of the kind). A store without a
** state table yet (written by an older buzz, opened read-only) has no
** rows.
*/
typedef void (*buzz_state_cb)(void *data, buzz_str name, buzz_str value);
int buzz__store_state(buzz_store *s, buzz_str kind, buzz_str name,
                      buzz_state_cb cb, void *data, char *err,
                      size_t errlen);

/* ---------------------------------------------------------------- ids.c */

/*
** The id reservation of a writing store (ids.c says how it works): ids are
** handed out only up to a reservation committed to the store, which the
** writer advances in blocks ahead of use, so a crash never repeats an id.
** CONSTRUCTOR: buzz__ids_open(), by store.c on the writer's connection
** before the writer starts   DESTRUCTOR: buzz__ids_close(), by store.c
*/
typedef struct buzz_ids buzz_ids;
struct sqlite3;

/*
** Reads the highest id an earlier session may have used (max(id), the
** reservation) into *last and reserves the first block. Returns an SQLite
** result code; a first block that cannot be written is not an error (the
** first publish asks again).
*/
int buzz__ids_open(buzz_ids **out, struct sqlite3 *db, int64_t *last);
void buzz__ids_close(buzz_ids *ids);                  /* NULL: nothing */
/* Writer thread: writes a BUZZ_ROW_IDS_* row (SQLite result code), and
** after each group, committed or rolled back, takes note. */
int buzz__ids_write(buzz_ids *ids, const buzz_row *r);
void buzz__ids_done(buzz_ids *ids, int is_committed);
/* store.c: the store's reservation, NULL for a reader. */
buzz_ids *buzz__store_ids(buzz_store *s);
/*
** Loop thread, before id is handed out (ids go up by one): makes sure id
** is reserved, asking the writer for the next block when less than half
** of this one is left, and waiting for its commit only if id is past what
** is committed. Sets *safe to the highest id that needs no further call.
** Returns 0, or BUZZ_ESTORE (read-only, or the reservation could not be
** committed: the writer's failure then waits for buzz__store_poll) or
** BUZZ_ENOMEM; id is then not to be used.
*/
int buzz__ids_take(buzz_store *s, int64_t id, int64_t *safe);
/* Loop thread, at a clean close: gives back the ids reserved above last,
** the highest handed out, so the next session goes on without a gap. */
int buzz__ids_release(buzz_store *s, int64_t last);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
