/*
** storeopen.c: opening and closing a store (store.c's header has the
** whole design). Opening claims the file (storelock.c), checks or makes
** the schema and its version, opens the writer's connection and starts
** its thread (buzz__store_writer_main, store.c), then the loop thread's
** read-only connection, and loads the id reservation and the last id.
** Closing stops the writer after it committed what was queued, then frees
** everything in reverse. A store that fails to open is closed here whole,
** so the caller never sees a half-open one.
**
** It does not write events or serve queries: store.c and storeread.c do.
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
  " dedup TEXT,"
  " stream TEXT,"                        /* optimistic concurrency: the */
  " stream_version INTEGER);"            /* stream and the event's place */
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

/*
** The spans of event-chain tracing (lua/buzz/trace.lua) as one relation:
** trace.lua keeps each traced event with its spans in a state row of
** kind "trace", written by the writer like every row and pruned with the
** events (store.c: prune_traces); this view gives them one row per span,
** for SQL and the sqlite3 shell.
*/
static const char *const spans_view_sql =
  "CREATE VIEW IF NOT EXISTS spans AS SELECT"
  " CAST(state.name AS INTEGER) AS event_id,"
  " json_extract(state.value, '$.type') AS type,"
  " json_extract(state.value, '$.correlation_id') AS correlation_id,"
  " json_extract(state.value, '$.causation_id') AS causation_id,"
  " json_extract(s.value, '$.span_id') AS span_id,"
  " json_extract(s.value, '$.subscription') AS subscription,"
  " json_extract(s.value, '$.attempt') AS attempt,"
  " json_extract(s.value, '$.start') AS start_ms,"
  " json_extract(s.value, '$.duration_us') AS duration_us,"
  " json_extract(s.value, '$.outcome') AS outcome,"
  " json_extract(s.value, '$.error') AS error,"
  " json_extract(s.value, '$.fate') AS fate,"
  " json_extract(s.value, '$.trace_id') AS trace_id,"
  " json_extract(s.value, '$.parent_span_id') AS parent_span_id"
  " FROM state, json_each(state.value, '$.spans') AS s"
  " WHERE state.kind = 'trace';";

/*
** Streams (optimistic concurrency, lua/buzz/stream.lua): the columns
** stream and stream_version, which a store made by an older buzz lacks
** (added once, in one transaction; ADD COLUMN rewrites no row), and the
** unique index on them, which makes two events at one place of a stream
** impossible and a stream's version one lookup. An older buzz opening the
** store afterwards leaves both columns NULL.
*/
static const char *const streams_sql =
  "CREATE UNIQUE INDEX IF NOT EXISTS events_stream ON events(stream, "
  "stream_version) WHERE stream IS NOT NULL;";

static int64_t has_stream_column(sqlite3 *db, int *rc) {
  return buzz__store_query_int(db, "SELECT count(*) FROM "
                               "pragma_table_info('events') WHERE name = "
                               "'stream'", 0, 0, 0, rc);
}

static int add_streams(buzz_store *s, char *err, size_t errlen) {
  int rc;
  int64_t has = has_stream_column(s->wdb, &rc);
  if (rc == SQLITE_OK && has == 0 &&
      (rc = buzz__store_exec(s->wdb, "BEGIN IMMEDIATE; ALTER TABLE events "
                             "ADD COLUMN stream TEXT; ALTER TABLE events ADD "
                             "COLUMN stream_version INTEGER; COMMIT"))
      != SQLITE_OK) {
    buzz__store_db_err(err, errlen, s, s->wdb);
    buzz__store_exec(s->wdb, "ROLLBACK");
    return BUZZ_ESTORE;
  }
  if (rc == SQLITE_OK) rc = buzz__store_exec(s->wdb, streams_sql);
  if (rc != SQLITE_OK) {
    buzz__store_db_err(err, errlen, s, s->wdb);
    return BUZZ_ESTORE;
  }
  return BUZZ_OK;
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
    if (buzz__store_exec(s->wdb, "BEGIN IMMEDIATE") != SQLITE_OK) goto fail;
    snprintf(b, sizeof b, "PRAGMA application_id = %d", APP_ID);
    if (buzz__store_exec(s->wdb, schema_sql) != SQLITE_OK || buzz__store_exec(s->wdb, b) != SQLITE_OK)
      goto fail_txn;
    snprintf(b, sizeof b, "PRAGMA user_version = %d", SCHEMA_VERSION);
    if (buzz__store_exec(s->wdb, b) != SQLITE_OK || buzz__store_exec(s->wdb, "COMMIT") != SQLITE_OK)
      goto fail_txn;
  } else {
    return check_version(s, ver, err, errlen);
  }
  return BUZZ_OK;
fail_txn:
  buzz__store_db_err(err, errlen, s, s->wdb);
  buzz__store_exec(s->wdb, "ROLLBACK");
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
  if ((rc = add_streams(s, err, errlen)) < 0) return rc;
  if (buzz__store_exec(s->wdb, "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, "
           "value)") != SQLITE_OK ||
      buzz__store_exec(s->wdb, "CREATE TABLE IF NOT EXISTS state (kind TEXT NOT NULL, "
           "name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, "
           "name)) WITHOUT ROWID") != SQLITE_OK)
    goto fail;
  snprintf(b, sizeof b, "PRAGMA synchronous = %s",
           s->o.durability == BUZZ_DUR_SYNC ? "FULL" : "NORMAL");
  if (buzz__store_exec(s->wdb, b) != SQLITE_OK) goto fail;
  if (s->o.max_bytes > 0) {
    int64_t page = buzz__store_query_int(s->wdb, "PRAGMA page_size", 0, 0, 0, &rc);
    snprintf(b, sizeof b, "PRAGMA max_page_count = %lld",
             (long long)(s->o.max_bytes / (page > 0 ? page : 4096)));
    if (buzz__store_exec(s->wdb, b) != SQLITE_OK) goto fail;
  }
  /* Within max_size; if it cannot be built (a full disk), the store
  ** opens all the same and the keys load by a walk of the log. */
  (void)buzz__store_exec(s->wdb, dedup_index_sql);
  (void)buzz__store_exec(s->wdb, spans_view_sql);   /* as the index: a */
                                                    /* store opens without */
  if (sqlite3_prepare_v2(s->wdb, "INSERT INTO events (id, type, ts, "
        "priority, key, correlation_id, causation_id, headers, payload, "
        "version, dedup, stream, stream_version) VALUES (?, ?, ?, ?, ?, ?, "
        "?, ?, ?, ?, ?, ?, ?)", -1,
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
  s->has_streams = has_stream_column(s->rdb, &rc) > 0;  /* an old store */
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
    if (uv_thread_create(&s->thread, buzz__store_writer_main, s) != 0) {
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
