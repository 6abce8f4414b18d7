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
** rows. The struct and the helpers both files use are in storeint.h.
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

#define APP_ID 0x62757a7a         /* "buzz", PRAGMA application_id */
#define SCHEMA_VERSION 1          /* PRAGMA user_version */
#define BACKLOG_ROWS 65536        /* rows queued before events are refused */
#define RETAIN_EVERY_MS 1000      /* retention pass at most this often */
#define RETAIN_CHUNK 5000         /* rows deleted per retention txn */

static const char *const schema_sql =
  "CREATE TABLE events ("
  " id INTEGER PRIMARY KEY,"
  " type TEXT NOT NULL,"
  " ts INTEGER NOT NULL,"
  " priority INTEGER NOT NULL,"
  " key,"                                /* TEXT or INTEGER, or NULL */
  " correlation_id TEXT,"
  " causation_id INTEGER,"
  " headers TEXT,"                       /* JSON object, or NULL */
  " payload TEXT,"                       /* JSON */
  " version INTEGER NOT NULL DEFAULT 1,"
  " dedup TEXT);"
  "CREATE INDEX events_dedup_ts ON events(ts, dedup) WHERE dedup IS NOT "
  "NULL;"
  "CREATE TABLE meta (key TEXT PRIMARY KEY, value);"
  "CREATE TABLE consumers ("
  " name TEXT PRIMARY KEY,"
  " pattern TEXT NOT NULL,"
  " acked INTEGER NOT NULL,"
  " updated INTEGER NOT NULL);";

/*
** The index the dedup keys load from at open (buzz__store_dedup_load):
** only events with a key, by time, so the keys of a window are one range
** of it and the rows themselves are never read. A store made by an older
** buzz has events_dedup (on dedup alone, which no query can use for a
** time range) instead: the first writer to open it builds this one, once,
** and drops that one (if it cannot, as on a full disk or at max_size,
** the store opens all the same and the keys load by a walk of the log,
** as before). An older buzz opening the store afterwards neither needs
** nor misses either; SQLite keeps the index up to date for it.
*/
static const char *const dedup_index_sql =
  "CREATE INDEX IF NOT EXISTS events_dedup_ts ON events(ts, dedup) WHERE "
  "dedup IS NOT NULL;"
  "DROP INDEX IF EXISTS events_dedup;";

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
             spec->headers.n + spec->payload.n + spec->dedup.n + 6;
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
#undef COPY
  return r;
}

static int exec(sqlite3 *db, const char *sql) {
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

/* buzz_match(pattern, type): the subject grammar as a SQL function. */
static void sql_match(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
  const char *p = (const char *)sqlite3_value_text(argv[0]);
  const char *t = (const char *)sqlite3_value_text(argv[1]);
  (void)argc;
  if (p == NULL || t == NULL) {
    sqlite3_result_int(ctx, 0);
    return;
  }
  sqlite3_result_int(ctx, buzz__subject_match(
    p, (size_t)sqlite3_value_bytes(argv[0]),
    t, (size_t)sqlite3_value_bytes(argv[1])));
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
static void retain(buzz_store *s) {
  int64_t now = buzz__clock_ms(), cut = 0, max_id, floor_id, held = 0;
  int rc;
  sqlite3_stmt *st;
  if (!s->o.max_age_ms && !s->o.max_events) return;
  if (now - s->last_retain < RETAIN_EVERY_MS) return;
  s->last_retain = now;
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

static void writer_main(void *arg) {
  buzz_store *s = arg;
  uv_mutex_lock(&s->mu);
  for (;;) {
    buzz_row *batch, *r;
    int64_t nrows = 0, nids = 0, lo = 0, hi = 0, batch_bytes = 0;
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
    is_full = room_for(s, batch_bytes) < 0;
    rc = is_full ? SQLITE_FULL : exec(s->wdb, "BEGIN IMMEDIATE");
    for (r = batch; r; r = r->next) {
      nrows++;
      nids += BUZZ_ROW_IS_IDS(r->kind);
      if (r->kind == BUZZ_ROW_EVENT) {
        if (lo == 0) lo = r->id;
        hi = r->id;
      }
      if (rc == SQLITE_OK) rc = write_row(s, r);
    }
    if (rc == SQLITE_OK) rc = exec(s->wdb, "COMMIT");
    free_rows(batch);                  /* before they leave the backlog */
    if (rc != SQLITE_OK) {
      failure *f = calloc(1, sizeof *f);
      const char *m = is_full ? s->full_msg : sqlite3_errmsg(s->wdb);
      if (f) {
        f->lo = lo;
        f->hi = hi;
        if ((f->msg = malloc(strlen(m) + 1)) != NULL) strcpy(f->msg, m);
      }
      if (!sqlite3_get_autocommit(s->wdb)) exec(s->wdb, "ROLLBACK");
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


/* ------------------------------------------------------------ open/close */

/*
** Claims the file (storelock.c): a writer takes the writer lock, or gets
** BUZZ_ELOCKED; s->file becomes the canonical path SQLite is to open.
*/
static int claim_file(buzz_store *s, char *err, size_t errlen) {
  return buzz__file_claim(s->path, !s->o.is_readonly, &s->fid, &s->file,
                          err, errlen);
}

/* A store whose schema this buzz does not know is left alone. */
static int check_version(const buzz_store *s, int64_t ver, char *err,
                         size_t errlen) {
  if (ver <= SCHEMA_VERSION) return BUZZ_OK;
  buzz__set_err(err, errlen, "%s was written by a newer buzz (schema %lld, this "
          "buzz knows %d); upgrade buzz to open it", s->path, (long long)ver,
          SCHEMA_VERSION);
  return BUZZ_ESTORE;
}

/*
** Checks that the file is a buzz store (or empty, and then makes it one).
** Runs on the writer connection before the writer thread starts.
*/
static int prepare_schema(buzz_store *s, char *err, size_t errlen) {
  int rc;
  int64_t app = buzz__store_query_int(s->wdb, "PRAGMA application_id", 0, 0, 0, &rc);
  int64_t ver, n;
  if (rc != SQLITE_OK) goto fail;
  ver = buzz__store_query_int(s->wdb, "PRAGMA user_version", 0, 0, 0, &rc);
  if (rc != SQLITE_OK) goto fail;
  n = buzz__store_query_int(s->wdb, "SELECT count(*) FROM sqlite_schema", 0, 0, 0, &rc);
  if (rc != SQLITE_OK) goto fail;
  if (app != APP_ID) {
    char b[64];
    if (n > 0 || app != 0) {
      buzz__set_err(err, errlen, "%s is an SQLite database but not a buzz store "
              "(it has %lld other schema objects); give buzz a file of its "
              "own", s->path, (long long)n);
      return BUZZ_ESTORE;
    }
    if (s->o.is_readonly) {
      buzz__set_err(err, errlen, "%s is not a buzz store yet (empty); open it "
              "for writing once to create it", s->path);
      return BUZZ_ESTORE;
    }
    if (exec(s->wdb, "BEGIN IMMEDIATE") != SQLITE_OK) goto fail;
    snprintf(b, sizeof b, "PRAGMA application_id = %d", APP_ID);
    if (exec(s->wdb, schema_sql) != SQLITE_OK || exec(s->wdb, b) != SQLITE_OK)
      goto fail_txn;
    snprintf(b, sizeof b, "PRAGMA user_version = %d", SCHEMA_VERSION);
    if (exec(s->wdb, b) != SQLITE_OK || exec(s->wdb, "COMMIT") != SQLITE_OK)
      goto fail_txn;
  } else {
    return check_version(s, ver, err, errlen);
  }
  return BUZZ_OK;
fail_txn:
  buzz__store_db_err(err, errlen, s, s->wdb);
  exec(s->wdb, "ROLLBACK");
  return BUZZ_ESTORE;
fail:
  buzz__store_db_err(err, errlen, s, s->wdb);
  return BUZZ_ESTORE;
}

static int open_db(buzz_store *s, sqlite3 **db, int flags, char *err,
                   size_t errlen) {
  if (sqlite3_open_v2(s->file, db, flags | SQLITE_OPEN_NOMUTEX, NULL)
      != SQLITE_OK) {
    buzz__store_db_err(err, errlen, s, *db);
    return BUZZ_ESTORE;
  }
  sqlite3_busy_timeout(*db, 5000);
  sqlite3_extended_result_codes(*db, 0);
  return BUZZ_OK;
}

/*
** What can be said about the path before SQLite opens it: a directory, a
** missing file for a reader, a file without write permission for a
** writer (refused even for root, who could write it anyway).
*/
static int check_path(buzz_store *s, char *err, size_t errlen) {
  struct stat sb;
  if (stat(s->path, &sb) != 0) {
    if (!s->o.is_readonly) return BUZZ_OK;        /* SQLite creates it */
    buzz__set_err(err, errlen, "%s: %s (readonly = true opens an existing store)",
            s->path, strerror(errno));
    return BUZZ_ESTORE;
  }
  if (S_ISDIR(sb.st_mode)) {
    buzz__set_err(err, errlen, "%s is a directory: give the path of a store file "
            "in it, such as %s/events.db", s->path, s->path);
    return BUZZ_ESTORE;
  }
  if (!s->o.is_readonly && (sb.st_mode & 0222) == 0) {
    buzz__set_err(err, errlen, "%s is read-only (no write permission bits); open "
            "it with readonly = true to read it", s->path);
    return BUZZ_ESTORE;
  }
  return BUZZ_OK;
}

static int open_writer(buzz_store *s, char *err, size_t errlen) {
  char b[96];
  int rc;
  if ((rc = claim_file(s, err, errlen)) < 0) return rc;
  if ((rc = open_db(s, &s->wdb, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                    err, errlen)) < 0)
    return rc;
  if (sqlite3_db_readonly(s->wdb, "main") == 1) {
    buzz__set_err(err, errlen, "%s cannot be written (read-only file or "
            "directory); open it with readonly = true to read it", s->path);
    return BUZZ_ESTORE;
  }
  (void)buzz__store_query_int(s->wdb, "PRAGMA journal_mode = WAL", 0, 0, 0, &rc);
  if (rc != SQLITE_OK) {
    buzz__store_db_err(err, errlen, s, s->wdb);
    return BUZZ_ESTORE;
  }
  if ((rc = prepare_schema(s, err, errlen)) < 0) return rc;
  if (exec(s->wdb, "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
           "value)") != SQLITE_OK ||
      exec(s->wdb, "CREATE TABLE IF NOT EXISTS state (kind TEXT NOT NULL, "
           "name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, "
           "name)) WITHOUT ROWID") != SQLITE_OK)
    goto fail;
  snprintf(b, sizeof b, "PRAGMA synchronous = %s",
           s->o.durability == BUZZ_DUR_SYNC ? "FULL" : "NORMAL");
  if (exec(s->wdb, b) != SQLITE_OK) goto fail;
  if (s->o.max_bytes > 0) {
    int64_t page = buzz__store_query_int(s->wdb, "PRAGMA page_size", 0, 0, 0, &rc);
    snprintf(b, sizeof b, "PRAGMA max_page_count = %lld",
             (long long)(s->o.max_bytes / (page > 0 ? page : 4096)));
    if (exec(s->wdb, b) != SQLITE_OK) goto fail;
  }
  /* Within max_size; if it cannot be built (a full disk), the store
  ** opens all the same and the keys load by a walk of the log. */
  (void)exec(s->wdb, dedup_index_sql);
  if (sqlite3_prepare_v2(s->wdb, "INSERT INTO events (id, type, ts, "
        "priority, key, correlation_id, causation_id, headers, payload, "
        "version, dedup) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", -1,
        &s->ins, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(s->wdb, "INSERT INTO consumers (name, pattern, "
        "acked, updated) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE "
        "SET pattern = excluded.pattern, acked = excluded.acked, "
        "updated = excluded.updated", -1, &s->ack, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(s->wdb, "DELETE FROM consumers WHERE name = ?", -1,
        &s->drop, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(s->wdb, "INSERT OR REPLACE INTO state (kind, name, "
        "value) VALUES (?, ?, ?)", -1, &s->put, NULL) != SQLITE_OK ||
      sqlite3_prepare_v2(s->wdb, "DELETE FROM state WHERE kind = ?1 AND "
        "(?2 IS NULL OR name = ?2)", -1, &s->del, NULL) != SQLITE_OK)
    goto fail;
  if (buzz__ids_open(&s->ids, s->wdb, &s->last_id) != SQLITE_OK) goto fail;
  return BUZZ_OK;
fail:
  buzz__store_db_err(err, errlen, s, s->wdb);
  return BUZZ_ESTORE;
}

int buzz__store_open(buzz_store **out, const char *path,
                     const buzz_store_opts *o, char *err, size_t errlen) {
  buzz_store *s = calloc(1, sizeof *s);
  int rc;
  *out = NULL;
  if (s == NULL) return BUZZ_ENOMEM;
  s->o = *o;
  if (s->o.max_backlog <= 0) s->o.max_backlog = BUZZ_BACKLOG_DEFAULT;
  if ((s->path = malloc(strlen(path) + 1)) == NULL) {
    free(s);
    return BUZZ_ENOMEM;
  }
  strcpy(s->path, path);
  if (uv_mutex_init(&s->mu) != 0) {
    free(s->path);
    free(s);
    return BUZZ_ENOMEM;
  }
  uv_cond_init(&s->work);
  uv_cond_init(&s->done);
  if ((rc = check_path(s, err, errlen)) < 0) goto fail;
  if (o->is_readonly && (rc = claim_file(s, err, errlen)) < 0) goto fail;
  if (!o->is_readonly && (rc = open_writer(s, err, errlen)) < 0) goto fail;
  if ((rc = open_db(s, &s->rdb, SQLITE_OPEN_READONLY, err, errlen)) < 0)
    goto fail;
  if (o->is_readonly) {
    int64_t ver, app = buzz__store_query_int(s->rdb, "PRAGMA application_id", 0, 0, 0, &rc);
    if (rc != SQLITE_OK) {
      buzz__store_db_err(err, errlen, s, s->rdb);
      rc = BUZZ_ESTORE;
      goto fail;
    }
    if (app != APP_ID) {
      buzz__set_err(err, errlen, "%s is not a buzz store (open it once without "
              "readonly to create one, or check the path)", path);
      rc = BUZZ_ESTORE;
      goto fail;
    }
    ver = buzz__store_query_int(s->rdb, "PRAGMA user_version", 0, 0, 0, &rc);
    if (rc != SQLITE_OK) {
      buzz__store_db_err(err, errlen, s, s->rdb);
      rc = BUZZ_ESTORE;
      goto fail;
    }
    if ((rc = check_version(s, ver, err, errlen)) < 0) goto fail;
    s->last_id = buzz__store_query_int(s->rdb, "SELECT max(id) FROM events", 0, 0, 0, &rc);
  }
  sqlite3_create_function(s->rdb, "buzz_match", 2,
                          SQLITE_UTF8 | SQLITE_DETERMINISTIC, NULL,
                          sql_match, NULL, NULL);
  s->committed_id = s->last_id;
  if (!o->is_readonly &&
      buzz__wal_start(&s->wal, s->wdb, s->file) < 0) {
    buzz__set_err(err, errlen, "%s: cannot start the checkpointer: %s", path,
            sqlite3_errmsg(s->wdb));
    rc = BUZZ_ESTORE;
    goto fail;
  }
  if (!o->is_readonly) {
    s->has_thread = 1;                 /* before the thread can read it */
    if (uv_thread_create(&s->thread, writer_main, s) != 0) {
      s->has_thread = 0;
      buzz__set_err(err, errlen, "%s: cannot start the writer thread", path);
      rc = BUZZ_ESTORE;
      goto fail;
    }
  }
  *out = s;
  return BUZZ_OK;
fail:
  buzz__store_close(s);
  return rc;
}

void buzz__store_close(buzz_store *s) {
  failure *f;
  int i;
  if (s == NULL) return;
  if (s->has_thread) {
    uv_mutex_lock(&s->mu);
    s->is_stopping = 1;
    uv_cond_signal(&s->work);
    uv_mutex_unlock(&s->mu);
    uv_thread_join(&s->thread);        /* the writer commits what is left */
  }
  buzz__wal_stop(s->wal);              /* while the writer's db is open */
  while (s->head) {                    /* rows of a writer never started */
    buzz_row *r = s->head->next;
    free(s->head);
    s->head = r;
  }
  for (i = 0; i < Q_SHAPES; i++) sqlite3_finalize(s->q_stmts[i]);
  sqlite3_finalize(s->ins);
  sqlite3_finalize(s->ack);
  sqlite3_finalize(s->drop);
  sqlite3_finalize(s->put);
  sqlite3_finalize(s->del);
  buzz__ids_close(s->ids);
  sqlite3_close(s->rdb);
  sqlite3_close(s->wdb);
  buzz__file_release(s->fid, !s->o.is_readonly);  /* after SQLite let go */
  while ((f = s->fails) != NULL) {
    s->fails = f->next;
    free(f->msg);
    free(f);
  }
  uv_cond_destroy(&s->work);
  uv_cond_destroy(&s->done);
  uv_mutex_destroy(&s->mu);
  free(s->path);
  free(s->file);
  free(s);
}

int64_t buzz__store_last_id(const buzz_store *s) {
  return s->last_id;
}

buzz_ids *buzz__store_ids(buzz_store *s) {
  return s->has_thread ? s->ids : NULL;
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
