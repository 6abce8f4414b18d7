/*
** ids.c: the id reservation of a store. An id is handed out only if it is
** at or below a reservation that is committed to the store (the meta row
** 'last_id': the row an older buzz kept its highest failed id in, so a
** store opened again by an older buzz still skips what was reserved),
** so no crash, in any durability mode, can hand an id out
** twice: after a restart, ids start above max(max(id), reservation).
**
** The writer advances the reservation in blocks, ahead of use, as rows of
** its own (BUZZ_ROW_IDS_RESERVE) in its group transactions: when less
** than half of the block is left, the loop thread asks for the next one
** and goes on handing out ids from the committed part, so it waits for the
** writer only if the ask has not committed by the time the reserved ids
** run out. A block covers about a second at the rate of the last block
** (IDS_MIN to IDS_MAX ids); a crash skips at most what was reserved and
** not handed out, at most one block. A clean close gives the rest back
** (BUZZ_ROW_IDS_RELEASE): ids go on without a gap.
**
** If the reservation cannot be written (a full disk, an I/O error), the
** group that carried it fails like any other, and once the committed ids
** run out, buzz__ids_take() fails: no unreserved id is ever handed out.
**
** Threads: the loop thread asks (buzz__ids_take, buzz__ids_release)
** through the store's queue; the writer writes (buzz__ids_write) and says
** how each group ended (buzz__ids_done); reserved and is_failed, which
** carry the news from one to the other, are under mu.
**
** It does not know Lua; readers (stores opened read-only) have none.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>
#include <uv.h>

#include "store.h"

#define IDS_MIN 1024                    /* ids per block, at least */
#define IDS_MAX (1 << 20)               /* and at most */
#define IDS_LEAD_NS 1000000000.0        /* a block covers about 1 s */

/*
** CONSTRUCTOR: buzz__ids_open()   DESTRUCTOR: buzz__ids_close()
*/
struct buzz_ids {
  uv_mutex_t mu;
  /* loop thread only */
  int64_t asked;       /* the highest reservation handed to the writer */
  int64_t block;       /* ids per block, adapted to the rate */
  int64_t ask_id;      /* the id that made the last ask, and when */
  uint64_t ask_ns;
  /* writer thread only */
  sqlite3_stmt *put;   /* owns */
  int64_t group;       /* what the current group sets the reservation to */
  int has_group;       /* the current group writes the reservation */
  int is_exact;        /* ... and lowers it (a release) */
  /* under mu */
  int64_t reserved;    /* committed: ids up to it may be handed out */
  int is_failed;       /* a group failed since the loop thread last looked */
};

/* The first column of sql's first row (0 if none); *rc the outcome. */
static int64_t first_int(sqlite3 *db, const char *sql, int *rc) {
  sqlite3_stmt *st;
  int64_t v = 0;
  if ((*rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL)) != SQLITE_OK)
    return 0;
  *rc = sqlite3_step(st);
  if (*rc == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  if (*rc == SQLITE_ROW || *rc == SQLITE_DONE) *rc = SQLITE_OK;
  sqlite3_finalize(st);
  return v;
}

/* Writes the reservation row: v, or max(v, what is there). */
static int put(buzz_ids *ids, int64_t v, int is_exact) {
  int rc;
  sqlite3_bind_int64(ids->put, 1, v);
  sqlite3_bind_int(ids->put, 2, is_exact);
  rc = sqlite3_step(ids->put);
  sqlite3_reset(ids->put);
  return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

int buzz__ids_open(buzz_ids **out, struct sqlite3 *db, int64_t *last) {
  static const char *const highs[] = {
    "SELECT max(id) FROM events",
    "SELECT value FROM meta WHERE key = 'last_id'"   /* the reservation */
  };
  buzz_ids *ids;
  int64_t high = 0;
  size_t i;
  int rc;
  *out = NULL;
  for (i = 0; i < sizeof highs / sizeof highs[0]; i++) {
    int64_t v = first_int(db, highs[i], &rc);
    if (rc != SQLITE_OK) return rc;
    if (v > high) high = v;
  }
  if ((ids = calloc(1, sizeof *ids)) == NULL) return SQLITE_NOMEM;
  if (uv_mutex_init(&ids->mu) != 0) {
    free(ids);
    return SQLITE_NOMEM;
  }
  if ((rc = sqlite3_prepare_v2(db, "INSERT INTO meta (key, value) VALUES "
                               "('last_id', ?1) ON CONFLICT (key) DO "
                               "UPDATE SET value = CASE WHEN ?2 THEN ?1 "
                               "ELSE max(value, ?1) END", -1, &ids->put,
                               NULL)) != SQLITE_OK) {
    buzz__ids_close(ids);
    return rc;
  }
  ids->reserved = ids->asked = high;
  ids->block = IDS_MIN;
  ids->ask_id = high + 1;
  ids->ask_ns = buzz__hrtime();
  /* The first block now, so the first publish need not wait. If it cannot
  ** be written (a full disk), the first publish asks again, and fails. */
  if (high <= INT64_MAX - IDS_MAX && put(ids, high + IDS_MIN, 0) == SQLITE_OK)
    ids->reserved = ids->asked = high + IDS_MIN;
  *last = high;
  *out = ids;
  return SQLITE_OK;
}

void buzz__ids_close(buzz_ids *ids) {
  if (ids == NULL) return;
  sqlite3_finalize(ids->put);
  uv_mutex_destroy(&ids->mu);
  free(ids);
}

int buzz__ids_write(buzz_ids *ids, const buzz_row *r) {
  int is_exact = r->kind == BUZZ_ROW_IDS_RELEASE;
  if (is_exact || !ids->has_group) {
    ids->group = r->id;
    ids->is_exact = is_exact;
  } else if (r->id > ids->group) {
    ids->group = r->id;
  }
  ids->has_group = 1;                  /* even if the write fails: then */
  return put(ids, r->id, is_exact);    /* the group does */
}

void buzz__ids_done(buzz_ids *ids, int is_committed) {
  uv_mutex_lock(&ids->mu);
  if (!is_committed) {
    ids->is_failed = 1;                /* maybe an ask: the loop asks again */
  } else if (ids->has_group) {
    if (ids->is_exact || ids->group > ids->reserved)
      ids->reserved = ids->group;
  }
  uv_mutex_unlock(&ids->mu);
  ids->has_group = 0;
}

/* The committed reservation; clears is_failed into *is_failed. */
static int64_t committed(buzz_ids *ids, int *is_failed) {
  int64_t v;
  uv_mutex_lock(&ids->mu);
  v = ids->reserved;
  *is_failed = ids->is_failed;
  ids->is_failed = 0;
  uv_mutex_unlock(&ids->mu);
  return v;
}

/*
** The next block's size: about IDS_LEAD_NS worth of ids at the rate since
** the last ask (id is the id asking now), within IDS_MIN..IDS_MAX.
*/
static int64_t next_block(buzz_ids *ids, int64_t id) {
  uint64_t now = buzz__hrtime(), dt = now - ids->ask_ns;
  int64_t n = id - ids->ask_id;
  double want;
  ids->ask_id = id;
  ids->ask_ns = now;
  if (n <= 0) return IDS_MIN;
  if (dt == 0) return IDS_MAX;
  want = (double)n * IDS_LEAD_NS / (double)dt;
  if (want >= IDS_MAX) return IDS_MAX;
  if (want <= IDS_MIN) return IDS_MIN;
  return (int64_t)want;
}

/* Hands the writer a reservation row of kind for v. */
static int ask(buzz_store *s, int kind, int64_t v) {
  buzz_row spec, *row;
  memset(&spec, 0, sizeof spec);
  spec.kind = kind;
  spec.id = v;
  if ((row = buzz__row_new(&spec)) == NULL) return BUZZ_ENOMEM;
  return buzz__store_append(s, row);
}

int buzz__ids_take(buzz_store *s, int64_t id, int64_t *safe) {
  buzz_ids *ids = buzz__store_ids(s);
  int64_t reserved, low;
  int is_failed, rc;
  if (ids == NULL) return BUZZ_ESTORE;            /* opened read-only */
  if (id <= 0 || id > INT64_MAX - IDS_MAX) return BUZZ_ESTORE;
  reserved = committed(ids, &is_failed);
  if (is_failed && ids->asked > reserved) ids->asked = reserved;
  if (ids->asked - id < ids->block / 2) {         /* under half a block */
    int64_t want;
    ids->block = next_block(ids, id);
    want = id - 1 + ids->block;
    if (want > ids->asked) {
      if ((rc = ask(s, BUZZ_ROW_IDS_RESERVE, want)) < 0) return rc;
      ids->asked = want;
    }
  }
  if (id > reserved) {                 /* ran out: wait for the commit */
    buzz__store_flush(s);
    reserved = committed(ids, &is_failed);
    if (id > reserved) {
      ids->asked = reserved;           /* it failed: ask again next time */
      return BUZZ_ESTORE;
    }
  }
  low = ids->asked - ids->block / 2;
  *safe = reserved < low ? reserved : low;
  return BUZZ_OK;
}

int buzz__ids_release(buzz_store *s, int64_t last) {
  if (buzz__store_ids(s) == NULL) return BUZZ_OK;
  return ask(s, BUZZ_ROW_IDS_RELEASE, last);
}
