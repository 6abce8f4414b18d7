/*
** storeread.c: the store's reads, on the loop thread's read-only
** connection: pages of events (buzz__store_query/next, one statement per
** shape of filters), durable consumers' positions, counts, sizes, the
** dedup keys loaded at open and the Lua layer's state rows. WAL lets it
** read while the writer writes, and it sees committed rows only.
**
** It never writes and never touches the writer's fields; store.c owns the
** connection and the statements it prepares here (closed in
** buzz__store_close).
*/
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sqlite3.h>

#include "buzz.h"
#include "storeint.h"

/* Prepares the statement of a query shape (Q_* bits) on the reader. */
static int query_prepare(buzz_store *s, int shape, sqlite3_stmt **st) {
  char sql[512];
  size_t n;
  n = (size_t)snprintf(sql, sizeof sql, "SELECT id, type, ts, priority, "
    "key, correlation_id, causation_id, headers, payload, version, %s FROM "
    "events WHERE id > ?1", s->has_streams ? "stream, stream_version"
                                           : "NULL, NULL");
#define WHERE(bit, cond)                                            \
  if ((shape & (bit)) && n < sizeof sql)                            \
    n += (size_t)snprintf(sql + n, sizeof sql - n, " AND %s", cond);
  WHERE(Q_TO_ID, "id <= ?2")
  WHERE(Q_FROM_TS, "ts >= ?3")
  WHERE(Q_TO_TS, "ts <= ?4")
  WHERE(Q_KEY, "key = ?5")
  WHERE(Q_PATTERN, "buzz_match(?6, type)")
#undef WHERE
  if (n < sizeof sql)
    snprintf(sql + n, sizeof sql - n, " ORDER BY id LIMIT ?7");
  return sqlite3_prepare_v3(s->rdb, sql, -1, SQLITE_PREPARE_PERSISTENT, st,
                            NULL);
}

int buzz__store_query(buzz_store *s, const buzz_query *q) {
  int shape = (q->to_id ? Q_TO_ID : 0) | (q->from_ts ? Q_FROM_TS : 0) |
              (q->to_ts ? Q_TO_TS : 0) | (q->has_key ? Q_KEY : 0) |
              (q->pattern.p ? Q_PATTERN : 0);
  sqlite3_stmt *st;
  if (s->q_stmt) sqlite3_reset(s->q_stmt);   /* the last page, if open */
  s->q_stmt = NULL;
  if ((st = s->q_stmts[shape]) == NULL) {
    if (query_prepare(s, shape, &st) != SQLITE_OK) return BUZZ_ESTORE;
    s->q_stmts[shape] = st;
  }
  s->q_stmt = st;
  sqlite3_bind_int64(st, 1, q->after_id);
  if (shape & Q_TO_ID) sqlite3_bind_int64(st, 2, q->to_id);
  if (shape & Q_FROM_TS) sqlite3_bind_int64(st, 3, q->from_ts);
  if (shape & Q_TO_TS) sqlite3_bind_int64(st, 4, q->to_ts);
  if (shape & Q_KEY) {
    if (q->is_key_int) sqlite3_bind_int64(st, 5, q->key_int);
    else buzz__store_bind_str(st, 5, q->key);
  }
  if (shape & Q_PATTERN) buzz__store_bind_str(st, 6, q->pattern);
  sqlite3_bind_int64(st, 7, q->limit > 0 ? q->limit : 1);
  return BUZZ_OK;
}

void buzz__store_query_done(buzz_store *s) {
  if (s->q_stmt) sqlite3_reset(s->q_stmt);
}

static buzz_str col_str(sqlite3_stmt *st, int i) {
  buzz_str v;
  v.p = (const char *)sqlite3_column_text(st, i);
  v.n = v.p ? (size_t)sqlite3_column_bytes(st, i) : 0;
  return v;
}

int buzz__store_next(buzz_store *s, buzz_stored *row, char *err,
                     size_t errlen) {
  sqlite3_stmt *st = s->q_stmt;
  int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) {
    sqlite3_reset(st);
    return 0;
  }
  if (rc != SQLITE_ROW) {
    buzz__store_db_err(err, errlen, s, s->rdb);
    sqlite3_reset(st);
    return BUZZ_ESTORE;
  }
  row->id = sqlite3_column_int64(st, 0);
  row->type = col_str(st, 1);
  row->ts = sqlite3_column_int64(st, 2);
  row->priority = sqlite3_column_int(st, 3);
  switch (sqlite3_column_type(st, 4)) {
  case SQLITE_NULL:
    row->key_kind = 0;
    break;
  case SQLITE_INTEGER:
    row->key_kind = 2;
    row->key_int = sqlite3_column_int64(st, 4);
    break;
  default:
    row->key_kind = 1;
    row->key = col_str(st, 4);
  }
  row->corr = col_str(st, 5);
  row->causation_id = sqlite3_column_int64(st, 6);
  row->headers = col_str(st, 7);
  row->payload = col_str(st, 8);
  row->version = sqlite3_column_int(st, 9);
  row->stream = col_str(st, 10);
  row->stream_version = sqlite3_column_int64(st, 11);
  return 1;
}

/* Prepares sql on the read connection: 0, or BUZZ_ESTORE with err. */
static int read_prepare(buzz_store *s, const char *sql, sqlite3_stmt **st,
                        char *err, size_t errlen) {
  if (sqlite3_prepare_v2(s->rdb, sql, -1, st, NULL) == SQLITE_OK) return 0;
  buzz__store_db_err(err, errlen, s, s->rdb);
  return BUZZ_ESTORE;
}

/* Finalizes a read whose last step gave rc: 0 if it ran to the end (or
** stopped at a row, with is_row_ok), else BUZZ_ESTORE with err. */
static int read_done(buzz_store *s, sqlite3_stmt *st, int rc, int is_row_ok,
                     char *err, size_t errlen) {
  int ok = rc == SQLITE_DONE || (is_row_ok && rc == SQLITE_ROW);
  if (!ok) buzz__store_db_err(err, errlen, s, s->rdb);
  sqlite3_finalize(st);
  return ok ? BUZZ_OK : BUZZ_ESTORE;
}

int buzz__store_consumer(buzz_store *s, const char *name, size_t len,
                         int64_t *acked, char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc, is_found;
  if (read_prepare(s, "SELECT acked FROM consumers WHERE name = ?", &st, err,
                   errlen) < 0)
    return BUZZ_ESTORE;
  sqlite3_bind_text(st, 1, name, (int)len, SQLITE_STATIC);
  rc = sqlite3_step(st);
  if ((is_found = rc == SQLITE_ROW)) *acked = sqlite3_column_int64(st, 0);
  if (read_done(s, st, rc, 1, err, errlen) < 0) return BUZZ_ESTORE;
  return is_found;
}

int buzz__store_consumers(buzz_store *s, buzz_consumer_cb cb, void *data,
                          char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  if (read_prepare(s, "SELECT name, pattern, acked, updated FROM consumers "
                   "ORDER BY name", &st, err, errlen) < 0)
    return BUZZ_ESTORE;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    cb(data, col_str(st, 0), col_str(st, 1), sqlite3_column_int64(st, 2),
       sqlite3_column_int64(st, 3));
  return read_done(s, st, rc, 0, err, errlen);
}

int buzz__store_types(buzz_store *s, buzz_count_cb cb, void *data,
                      char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  if (read_prepare(s, "SELECT type, count(*) FROM events GROUP BY type "
                   "ORDER BY type", &st, err, errlen) < 0)
    return BUZZ_ESTORE;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    cb(data, col_str(st, 0), sqlite3_column_int64(st, 1));
  return read_done(s, st, rc, 0, err, errlen);
}

int buzz__store_stream_version(buzz_store *s, buzz_str stream, int64_t *v,
                               char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  *v = 0;
  if (!s->has_streams) return BUZZ_OK;    /* an older store: no streams */
  if (read_prepare(s, "SELECT max(stream_version) FROM events WHERE "
                   "stream = ?1", &st, err, errlen) < 0)
    return BUZZ_ESTORE;
  buzz__store_bind_str(st, 1, stream);
  rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) *v = sqlite3_column_int64(st, 0);
  return read_done(s, st, rc, 1, err, errlen);
}

int buzz__store_count(buzz_store *s, int64_t after, buzz_str pattern,
                      int64_t *n, char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  if (read_prepare(s, "SELECT count(*) FROM events WHERE id > ?1 AND "
                   "(?2 IS NULL OR buzz_match(?2, type))", &st, err,
                   errlen) < 0)
    return BUZZ_ESTORE;
  sqlite3_bind_int64(st, 1, after);
  buzz__store_bind_str(st, 2, pattern);
  rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) *n = sqlite3_column_int64(st, 0);
  return read_done(s, st, rc, 1, err, errlen);
}

int buzz__store_size(buzz_store *s, int64_t *count, int64_t *first,
                     int64_t *last, int64_t *bytes, int64_t *wal_bytes,
                     char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  /* count(*) reads every page of the log. Without it, each of min(id)
  ** and max(id) alone in its query is one descent of the rowid b-tree
  ** (SQLite's min/max optimization; together in one query they would
  ** be a scan). */
  if (read_prepare(s, count ? "SELECT min(id), max(id), count(*) FROM "
                   "events" : "SELECT (SELECT min(id) FROM events), "
                   "(SELECT max(id) FROM events)", &st, err, errlen) < 0)
    return BUZZ_ESTORE;
  if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    *first = sqlite3_column_int64(st, 0);
    *last = sqlite3_column_int64(st, 1);
    if (count) *count = sqlite3_column_int64(st, 2);
  }
  if (read_done(s, st, rc, 1, err, errlen) < 0) return BUZZ_ESTORE;
  *bytes = buzz__store_file_bytes(s, wal_bytes);
  return BUZZ_OK;
}

int buzz__store_dedup_load(buzz_store *s, int64_t since, buzz_dedup_cb cb,
                           void *data, char *err, size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  if (read_prepare(s, "SELECT dedup, id, ts FROM events WHERE dedup IS NOT "
                   "NULL AND ts >= ? ORDER BY ts, dedup, id", &st, err,
                   errlen) < 0)
    return BUZZ_ESTORE;
  sqlite3_bind_int64(st, 1, since);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    cb(data, col_str(st, 0), sqlite3_column_int64(st, 1),
       sqlite3_column_int64(st, 2));
  return read_done(s, st, rc, 0, err, errlen);
}

int buzz__store_state(buzz_store *s, buzz_str kind, buzz_str name,
                      buzz_state_cb cb, void *data, char *err,
                      size_t errlen) {
  sqlite3_stmt *st;
  int rc;
  const char *sql = name.p != NULL ?
    "SELECT name, value FROM state WHERE kind = ? AND name = ?" :
    "SELECT name, value FROM state WHERE kind = ? ORDER BY name";
  if (sqlite3_prepare_v2(s->rdb, sql, -1, &st, NULL) != SQLITE_OK) {
    int64_t has;
    buzz__store_db_err(err, errlen, s, s->rdb);    /* before another call resets it */
    has = buzz__store_query_int(s->rdb, "SELECT count(*) FROM sqlite_schema WHERE "
                    "type = 'table' AND name = 'state'", 0, 0, 0, &rc);
    if (rc != SQLITE_OK || has != 0) return BUZZ_ESTORE;
    if (err && errlen) err[0] = '\0';  /* an older store: no rows */
    return BUZZ_OK;
  }
  buzz__store_bind_str(st, 1, kind);
  if (name.p != NULL) buzz__store_bind_str(st, 2, name);
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    cb(data, col_str(st, 0), col_str(st, 1));
  return read_done(s, st, rc, 0, err, errlen);
}
