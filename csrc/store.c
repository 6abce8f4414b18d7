/*
** store.c: the durable log. One SQLite file in WAL mode holds the events
** (table events, one row per event, id = ev.id), the durable consumers'
** positions (table consumers) and the Lua layer's state rows (table
** state: kind, name -> value; created at open by any writer, so a store
** written by an older buzz may lack it until a newer one writes it).
**
** Writing: a writer thread of the store's own owns the only read-write
** connection. The loop thread hands it buzz_row records through a queue
** (mutex + condition variables); the writer takes everything queued at
** once and writes it in one transaction (group commit), so a burst of
** publishes costs one commit, and a lone publish waits for nobody. After a
** commit it advances the committed id, wakes waiters and calls notify (the
** loop's async handle, so a polled descriptor becomes readable).
** Retention runs on the writer too, in small transactions between groups.
** The rows the writer holds, queued or in flight, are counted in bytes
** until it frees them: an event past max_backlog is refused (EFULL), so
** the loop thread never waits for room. With max_size, a group that would
** take the file and its WAL together past it fails before it starts.
** Checkpoints run off the commits, on storewal.c's thread.
**
** Reading: a second, read-only connection, used only on the loop thread,
** serves queries, consumer positions and statistics (storeread.c). WAL
** lets it read while the writer writes, and it only ever sees committed
** rows. Opening and closing are in storeopen.c. The struct and the
** helpers these files share are in storeint.h.
**
** One writer per file: a writer holds an exclusive flock() on the database
** file itself for its lifetime, taken through storelock.c, which knows the
** file by device and inode (so a symlink, a hard link or a "../" path meet
** the same lock) and keeps the one descriptor of the file this process
** may have (closing any descriptor of the database would drop SQLite's
** POSIX locks). A second writer, from this process or another, gets
** BUZZ_ELOCKED; readers (is_readonly) take no lock but share the
** descriptor. SQLite opens the file's canonical path (file), never the
** given one (path, for messages), so every name but a hard link gives it
** the same -wal and -shm files.
**
** Failures: a commit that fails is rolled back whole: the log keeps only
** complete groups. The failure (message and the ids it lost) is latched
** and reported once, by the next append or flush.
**
** Ids: the writer also keeps the id reservation (ids.c) in its groups: ids
** are handed out only up to a committed reservation, so none is reused.
**
** Invariants: ids increase; the newest event is never deleted by retention;
** an event at or below no durable consumer's position is deleted.
**
** It does not know Lua, JSON or subscriptions: payloads arrive as text.
*/
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sqlite3.h>
#include <uv.h>

#include "buzz.h"
#include "storeint.h"

#define BACKLOG_ROWS 65536        /* rows queued before events are refused */
#define RETAIN_EVERY_MS 1000      /* retention pass at most this often */
#define RETAIN_CHUNK 5000         /* rows deleted per retention txn */


/* ------------------------------------------------------------ helpers */


void buzz__store_db_err(char *err, size_t errlen, const buzz_store *s,
                        sqlite3 *db) {
  buzz__set_err(err, errlen, "%s: %s", s->path,
          db ? sqlite3_errmsg(db) : "cannot open");
}

/*
** Bytes on disk of the database and its WAL together (the WAL's alone in
** *wal if wal is not NULL). Any thread: it only stats the files.
*/
int64_t buzz__store_file_bytes(const buzz_store *s, int64_t *wal) {
  struct stat sb;
  size_t n = strlen(s->file);
  int64_t total = stat(s->file, &sb) == 0 ? (int64_t)sb.st_size : 0, w = 0;
  char *p = malloc(n + 5);
  if (p != NULL) {
    memcpy(p, s->file, n);
    memcpy(p + n, "-wal", 5);
    if (stat(p, &sb) == 0) w = (int64_t)sb.st_size;
    free(p);
  }
  if (wal) *wal = w;
  return total + w;
}

/* Bytes a row takes in memory: the record and its strings (row_new). */
static int64_t row_bytes(const buzz_row *r) {
  return (int64_t)(sizeof *r + r->type.n + r->key.n + r->corr.n +
                   r->headers.n + r->payload.n + r->dedup.n + 6);
}

buzz_row *buzz__row_new(const buzz_row *spec) {
  size_t n = sizeof *spec + spec->type.n + spec->key.n + spec->corr.n +
             spec->headers.n + spec->payload.n + spec->dedup.n +
             spec->stream.n + 7;
  buzz_row *r = malloc(n);
  char *p;
  if (r == NULL) return NULL;
  *r = *spec;
  r->next = NULL;
  p = (char *)(r + 1);
#define COPY(f)                                  \
  if (spec->f.p) {                               \
    memcpy(p, spec->f.p, spec->f.n);             \
    p[spec->f.n] = '\0';                         \
    r->f.p = p;                                  \
    p += spec->f.n + 1;                          \
  }
  COPY(type) COPY(key) COPY(corr) COPY(headers) COPY(payload) COPY(dedup)
  COPY(stream)
#undef COPY
  return r;
}

int buzz__store_exec(sqlite3 *db, const char *sql) {
  return sqlite3_exec(db, sql, NULL, NULL, NULL);
}

/*
** Runs sql with nargs (0 to 2) integer parameters a, b and returns the
** first column of its first row, 0 if it has none. *rc is SQLITE_OK or the
** error.
*/
int64_t buzz__store_query_int(sqlite3 *db, const char *sql, int nargs,
                              int64_t a, int64_t b, int *rc) {
  sqlite3_stmt *st;
  int64_t v = 0;
  *rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
  if (*rc != SQLITE_OK) return 0;
  if (nargs > 0) sqlite3_bind_int64(st, 1, a);
  if (nargs > 1) sqlite3_bind_int64(st, 2, b);
  *rc = sqlite3_step(st);
  if (*rc == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  if (*rc == SQLITE_ROW || *rc == SQLITE_DONE) *rc = SQLITE_OK;
  sqlite3_finalize(st);
  return v;
}

/* ------------------------------------------------------------ writer */

int buzz__store_bind_str(sqlite3_stmt *st, int i, buzz_str v) {
  if (v.p == NULL) return sqlite3_bind_null(st, i);
  return sqlite3_bind_text(st, i, v.p, (int)v.n, SQLITE_STATIC);
}

static int write_row(buzz_store *s, buzz_row *r) {
  sqlite3_stmt *st;
  int rc;
  switch (r->kind) {
  case BUZZ_ROW_EVENT:
    st = s->ins;
    sqlite3_bind_int64(st, 1, r->id);
    buzz__store_bind_str(st, 2, r->type);
    sqlite3_bind_int64(st, 3, r->ts);
    sqlite3_bind_int(st, 4, r->priority);
    if (r->is_key_int) sqlite3_bind_int64(st, 5, r->key_int);
    else buzz__store_bind_str(st, 5, r->key);
    buzz__store_bind_str(st, 6, r->corr);
    if (r->causation_id) sqlite3_bind_int64(st, 7, r->causation_id);
    else sqlite3_bind_null(st, 7);
    buzz__store_bind_str(st, 8, r->headers);
    buzz__store_bind_str(st, 9, r->payload);
    sqlite3_bind_int(st, 10, r->version);
    buzz__store_bind_str(st, 11, r->dedup);
    buzz__store_bind_str(st, 12, r->stream);
    if (r->stream_version > 0) sqlite3_bind_int64(st, 13, r->stream_version);
    else sqlite3_bind_null(st, 13);
    break;
  case BUZZ_ROW_ACK:
    st = s->ack;
    buzz__store_bind_str(st, 1, r->type);
    buzz__store_bind_str(st, 2, r->key);
    sqlite3_bind_int64(st, 3, r->id);
    sqlite3_bind_int64(st, 4, r->ts);
    break;
  case BUZZ_ROW_DROP_CONSUMER:
    st = s->drop;
    buzz__store_bind_str(st, 1, r->type);
    break;
  case BUZZ_ROW_STATE_PUT:
    st = s->put;
    buzz__store_bind_str(st, 1, r->type);
    buzz__store_bind_str(st, 2, r->key);
    buzz__store_bind_str(st, 3, r->payload);
    break;
  case BUZZ_ROW_STATE_DEL:
    st = s->del;
    buzz__store_bind_str(st, 1, r->type);
    buzz__store_bind_str(st, 2, r->key);           /* NULL: the whole kind */
    break;
  case BUZZ_ROW_IDS_RESERVE:
  case BUZZ_ROW_IDS_RELEASE:
    return buzz__ids_write(s->ids, r);
  default:
    return SQLITE_MISUSE;
  }
  rc = sqlite3_step(st);
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
  return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* Deletes expired events in small transactions. Writer thread. */
/*
** The traces of the events retention dropped go too (every pass: a trace
** row may come after its event was dropped): the state rows that
** lua/buzz/trace.lua keeps by event id ("trace", "trace_child": names are
** zero-padded ids) below the oldest event kept, and the correlations
** whose events are all gone ("trace_corr": a JSON list of ids). Best
** effort: a failure leaves rows for the next pass. Writer thread.
*/
static void prune_traces(buzz_store *s) {
  char below[32];
  sqlite3_stmt *st;
  int rc;
  int64_t oldest = buzz__store_query_int(s->wdb, "SELECT min(id) FROM "
                                         "events", 0, 0, 0, &rc);
  if (rc != SQLITE_OK || oldest <= 1) return;
  snprintf(below, sizeof below, "%016lld", (long long)oldest);
  if (sqlite3_prepare_v2(s->wdb, "DELETE FROM state WHERE kind IN "
                         "('trace', 'trace_child') AND name < ?1", -1, &st,
                         NULL) == SQLITE_OK) {
    sqlite3_bind_text(st, 1, below, -1, SQLITE_TRANSIENT);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE || sqlite3_changes(s->wdb) == 0)
      return;                          /* nothing went: no pass over */
  }                                    /* the correlations */
  if (sqlite3_prepare_v2(s->wdb, "DELETE FROM state WHERE kind = "
                         "'trace_corr' AND (SELECT max(value) FROM "
                         "json_each(state.value)) <= ?1", -1, &st,
                         NULL) == SQLITE_OK) {
    sqlite3_bind_int64(st, 1, oldest - 1);
    sqlite3_step(st);
    sqlite3_finalize(st);
  }
}

static void retain(buzz_store *s) {
  int64_t now = buzz__clock_ms(), cut = 0, max_id, floor_id, held = 0;
  int rc;
  sqlite3_stmt *st;
  if (!s->o.max_age_ms && !s->o.max_events) return;
  if (now - s->last_retain < RETAIN_EVERY_MS) return;
  s->last_retain = now;
  prune_traces(s);                         /* what earlier passes dropped */
  if (s->o.max_events > 0)                 /* older than the newest n */
    cut = buzz__store_query_int(s->wdb, "SELECT id FROM events ORDER BY id DESC LIMIT 1 "
                    "OFFSET ?", 1, s->o.max_events, 0, &rc);
  if (s->o.max_age_ms > 0) {  /* ids follow time: the first young event */
    int64_t young = buzz__store_query_int(s->wdb, "SELECT coalesce((SELECT id FROM "
                              "events WHERE ts >= ? ORDER BY id LIMIT 1), "
                              "(SELECT max(id) FROM events))", 1,
                              now - s->o.max_age_ms, 0, &rc);
    if (young - 1 > cut) cut = young - 1;
  }
  /* never the newest event, never past a durable consumer */
  max_id = buzz__store_query_int(s->wdb, "SELECT max(id) FROM events", 0, 0, 0, &rc);
  if (cut >= max_id) cut = max_id - 1;
  floor_id = buzz__store_query_int(s->wdb, "SELECT min(coalesce(min(acked), ?1), ?1) "
                       "FROM consumers", 1, cut, 0, &rc);
  if (floor_id < cut)
    held = buzz__store_query_int(s->wdb, "SELECT count(*) FROM events WHERE id > ? AND "
                     "id <= ?", 2, floor_id, cut, &rc);
  uv_mutex_lock(&s->mu);
  s->st.held_back = held;
  uv_mutex_unlock(&s->mu);
  if (floor_id <= 0) return;
  if (sqlite3_prepare_v2(s->wdb, "DELETE FROM events WHERE id IN (SELECT id "
                         "FROM events WHERE id <= ? ORDER BY id LIMIT ?)",
                         -1, &st, NULL) != SQLITE_OK)
    return;
  for (;;) {
    int n;
    sqlite3_bind_int64(st, 1, floor_id);
    sqlite3_bind_int(st, 2, RETAIN_CHUNK);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) break;
    n = sqlite3_changes(s->wdb);
    uv_mutex_lock(&s->mu);
    s->st.deleted += n;
    uv_mutex_unlock(&s->mu);
    if (n < RETAIN_CHUNK) break;
    uv_mutex_lock(&s->mu);          /* let waiting groups go first */
    n = s->head != NULL || s->is_stopping;
    uv_mutex_unlock(&s->mu);
    if (n) break;
  }
  sqlite3_finalize(st);
}

/*
** With max_size: may a group of rows of group_bytes be written without the
** database and its WAL passing max_bytes together? When not, first
** checkpoints the WAL into the database and truncates it (no busy wait: a
** reader in the way leaves the WAL as it is). The estimate of what the
** group adds is its bytes and a quarter more for pages, and four pages.
** Writer thread, between groups. 0, or -1 with full_msg set.
*/
static int room_for(buzz_store *s, int64_t group_bytes) {
  int64_t wal, total, need;
  int rc;
  if (s->o.max_bytes <= 0) return 0;
  need = group_bytes + group_bytes / 4 + 4 * 4096;
  total = buzz__store_file_bytes(s, &wal);
  if (total + need <= s->o.max_bytes) return 0;
  if (wal > 0) {
    sqlite3_busy_timeout(s->wdb, 0);
    rc = sqlite3_wal_checkpoint_v2(s->wdb, NULL, SQLITE_CHECKPOINT_TRUNCATE,
                                   NULL, NULL);
    sqlite3_busy_timeout(s->wdb, 5000);
    (void)rc;                          /* the sizes tell what it did */
    total = buzz__store_file_bytes(s, &wal);
    if (total + need <= s->o.max_bytes) return 0;
  }
  snprintf(s->full_msg, sizeof s->full_msg, "database or disk is full: "
           "max_size is %lld bytes, and the store and its WAL hold %lld "
           "(%lld more needed)", (long long)s->o.max_bytes,
           (long long)total, (long long)need);
  return -1;
}

/* Frees a written group of rows. */
static void free_rows(buzz_row *r) {
  while (r) {
    buzz_row *next = r->next;
    free(r);
    r = next;
  }
}

/* A commit of events took us microseconds: into the histogram. */
static void count_commit(buzz_store_stats *st, uint64_t us) {
#ifndef BUZZ_NO_METRICS
  static const int64_t bounds[BUZZ_COMMIT_BUCKETS] = BUZZ_COMMIT_BOUNDS_US;
  int b = 0;
  while (b < BUZZ_COMMIT_BUCKETS && (int64_t)us > bounds[b]) b++;
  st->commit_le[b]++;
  st->commit_us += (int64_t)us;
#else
  (void)st;
  (void)us;
#endif
}

void buzz__store_writer_main(void *arg) {
  buzz_store *s = arg;
  uv_mutex_lock(&s->mu);
  for (;;) {
    buzz_row *batch, *r;
    int64_t nrows = 0, nids = 0, lo = 0, hi = 0, batch_bytes = 0;
    uint64_t began;
    int rc, is_full;
    while (s->head == NULL && !s->is_stopping) {
      if (s->o.max_age_ms || s->o.max_events) {
        uv_mutex_unlock(&s->mu);
        retain(s);
        uv_mutex_lock(&s->mu);
        if (s->head != NULL || s->is_stopping) break;
        uv_cond_timedwait(&s->work, &s->mu,
                          (uint64_t)RETAIN_EVERY_MS * 1000000u);
      } else {
        uv_cond_wait(&s->work, &s->mu);
      }
    }
    if (s->head == NULL && s->is_stopping) break;
    batch = s->head;
    s->head = s->tail = NULL;
    s->nqueued = 0;
    uv_mutex_unlock(&s->mu);

    for (r = batch; r; r = r->next) batch_bytes += row_bytes(r);
    began = uv_hrtime();
    is_full = room_for(s, batch_bytes) < 0;
    rc = is_full ? SQLITE_FULL : buzz__store_exec(s->wdb, "BEGIN IMMEDIATE");
    for (r = batch; r; r = r->next) {
      nrows++;
      nids += BUZZ_ROW_IS_IDS(r->kind);
      if (r->kind == BUZZ_ROW_EVENT) {
        if (lo == 0) lo = r->id;
        hi = r->id;
      }
      if (rc == SQLITE_OK) rc = write_row(s, r);
    }
    if (rc == SQLITE_OK) rc = buzz__store_exec(s->wdb, "COMMIT");
    free_rows(batch);                  /* before they leave the backlog */
    if (rc != SQLITE_OK) {
      failure *f = calloc(1, sizeof *f);
      const char *m = is_full ? s->full_msg : sqlite3_errmsg(s->wdb);
      if (f) {
        f->lo = lo;
        f->hi = hi;
        if ((f->msg = malloc(strlen(m) + 1)) != NULL) strcpy(f->msg, m);
      }
      if (!sqlite3_get_autocommit(s->wdb)) buzz__store_exec(s->wdb, "ROLLBACK");
      buzz__ids_done(s->ids, 0);       /* before waiters wake */
      uv_mutex_lock(&s->mu);
      if (f) {
        if (s->fails_tail) s->fails_tail->next = f;
        else s->fails = f;
        s->fails_tail = f;
      }
      s->st.failed += nrows - nids;
    } else {
      buzz__ids_done(s->ids, 1);
      uv_mutex_lock(&s->mu);
      if (hi > s->committed_id) s->committed_id = hi;
      s->st.committed += nrows - nids;
      s->st.commits += nrows > nids;
      if (nrows > nids) count_commit(&s->st, (uv_hrtime() - began) / 1000);
    }
    s->done_seq += nrows;
    s->qbytes -= batch_bytes;
    uv_cond_broadcast(&s->done);
    uv_mutex_unlock(&s->mu);
    if (s->o.notify) s->o.notify(s->o.data);
    buzz__wal_catch_up(s->wal);
    retain(s);
    uv_mutex_lock(&s->mu);
  }
  uv_mutex_unlock(&s->mu);
}


/* ------------------------------------------------------------ appends */

int buzz__store_append(buzz_store *s, buzz_row *row) {
  int64_t n = row_bytes(row);
  if (!s->has_thread) {
    free(row);
    return BUZZ_ESTORE;
  }
  uv_mutex_lock(&s->mu);
  if (row->kind == BUZZ_ROW_EVENT && s->qbytes > 0 &&
      (s->nqueued >= BACKLOG_ROWS || s->qbytes + n > s->o.max_backlog)) {
    s->st.refused++;                   /* back-pressure, never a wait */
    uv_mutex_unlock(&s->mu);
    free(row);
    return BUZZ_EFULL;
  }
  if (s->tail) s->tail->next = row;
  else s->head = row;
  s->tail = row;
  s->nqueued++;
  s->qbytes += n;
  if (s->qbytes > s->st.backlog_peak) s->st.backlog_peak = s->qbytes;
  s->st.appended += !BUZZ_ROW_IS_IDS(row->kind);
  s->appended_seq++;
  if (s->nqueued == 1) uv_cond_signal(&s->work);
  uv_mutex_unlock(&s->mu);
  return BUZZ_OK;
}

void buzz__store_flush(buzz_store *s) {
  if (!s->has_thread) return;
  uv_mutex_lock(&s->mu);
  while (s->done_seq < s->appended_seq) uv_cond_wait(&s->done, &s->mu);
  uv_mutex_unlock(&s->mu);
}

int buzz__store_poll(buzz_store *s, int64_t *committed, buzz_fail_cb cb,
                     void *data) {
  int n = 0;
  failure *f;
  uv_mutex_lock(&s->mu);
  *committed = s->committed_id;
  while ((f = s->fails) != NULL) {
    if ((s->fails = f->next) == NULL) s->fails_tail = NULL;
    cb(data, f->msg ? f->msg : "out of memory", f->lo, f->hi);
    free(f->msg);
    free(f);
    n++;
  }
  uv_mutex_unlock(&s->mu);
  return n;
}

int64_t buzz__store_committed(buzz_store *s) {
  int64_t v;
  uv_mutex_lock(&s->mu);
  v = s->committed_id;
  uv_mutex_unlock(&s->mu);
  return v;
}

int buzz__store_is_idle(buzz_store *s) {
  int idle;
  if (!s->has_thread) return 1;
  uv_mutex_lock(&s->mu);
  idle = s->done_seq >= s->appended_seq && s->fails == NULL;
  uv_mutex_unlock(&s->mu);
  return idle;
}

void buzz__store_stats(buzz_store *s, buzz_store_stats *st) {
  uv_mutex_lock(&s->mu);
  *st = s->st;
  st->pending = s->appended_seq - s->done_seq;
  st->committed_id = s->committed_id;
  st->backlog_bytes = s->qbytes;
  st->backlog_limit = s->o.max_backlog;
  st->checkpoints = buzz__wal_checkpoints(s->wal);
  uv_mutex_unlock(&s->mu);
}
