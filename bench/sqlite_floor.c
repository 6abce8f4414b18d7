/*
** sqlite_floor.c: the raw SQLite floor for the store benchmark
** (bench/store.lua compiles and runs it).
**
**   sqlite_floor <db path> <rows> [rows per transaction, default 1000]
**
** Inserts rows into the events table of an existing, empty buzz store
** (bench/store.lua makes one with buzz.new{ store = path } and closes it),
** so the table, its index and the file's page size are buzz's own: this
** program creates no schema, and exits 1 if the file or the table is
** missing or the table is not empty. It sets the PRAGMAs of buzz's writer
** under "batch" durability (journal_mode = WAL, synchronous = NORMAL) and
** inserts through one prepared INSERT with explicit ids, a fixed number
** of rows per transaction. Each row carries what buzz would store for
** bus:publish("order.placed", { n = i, sku = "A-1", qty = 3 }): the type,
** a millisecond timestamp, priority 2 (normal), version 1, the payload as
** JSON text (formatted per row, as buzz encodes per event) and NULL for
** the rest. Prints one line:
**
**   rows=<n> wall=<seconds> cpu=<seconds>
**
** timing the inserts only (first BEGIN to last COMMIT), not the open.
** Exits 1 with a message on stderr if SQLite fails.
**
** It does not do what buzz does besides: no queue, no writer thread, no
** Lua, no matching. That is the point: it is the floor.
*/
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <sqlite3.h>

static const char *const insert_sql =
  "INSERT INTO events (id, type, ts, priority, key, correlation_id, "
  "causation_id, headers, payload, version, dedup) "
  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

static double wall_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static sqlite3_int64 now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (sqlite3_int64)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Prints SQLite's message for what and exits 1. */
static void die(sqlite3 *db, const char *what) {
  fprintf(stderr, "sqlite_floor: %s: %s\n", what,
          db ? sqlite3_errmsg(db) : "out of memory");
  exit(1);
}

static void exec(sqlite3 *db, const char *sql) {
  if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) die(db, sql);
}

/* The one integer sql returns, or -1 if it returns no row. */
static sqlite3_int64 query_int(sqlite3 *db, const char *sql) {
  sqlite3_stmt *st;
  sqlite3_int64 v = -1;
  int rc;
  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) die(db, sql);
  rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) v = sqlite3_column_int64(st, 0);
  else if (rc != SQLITE_DONE) die(db, sql);
  sqlite3_finalize(st);
  return v;
}

/* Exits 1 unless path's database has an empty events table. */
static void check_store(sqlite3 *db, const char *path) {
  if (query_int(db, "SELECT count(*) FROM sqlite_master "
                "WHERE type = 'table' AND name = 'events'") != 1) {
    fprintf(stderr, "sqlite_floor: %s has no events table: create the "
            "store first (buzz.new{ store = path }, then close it)\n",
            path);
    exit(1);
  }
  if (query_int(db, "SELECT count(*) FROM events") != 0) {
    fprintf(stderr, "sqlite_floor: the events table of %s is not empty\n",
            path);
    exit(1);
  }
}

int main(int argc, char **argv) {
  sqlite3 *db = NULL;
  sqlite3_stmt *ins;
  long rows, per_txn, i;
  double w0, w1;
  clock_t c0, c1;
  char payload[96];
  if (argc < 3 || argc > 4) {
    fprintf(stderr, "usage: sqlite_floor <db path> <rows> [rows per txn]\n");
    return 2;
  }
  rows = strtol(argv[2], NULL, 10);
  per_txn = argc == 4 ? strtol(argv[3], NULL, 10) : 1000;
  if (rows <= 0 || per_txn <= 0) {
    fprintf(stderr, "sqlite_floor: rows and rows per txn must be > 0\n");
    return 2;
  }
  /* No SQLITE_OPEN_CREATE: the store must exist. */
  if (sqlite3_open_v2(argv[1], &db, SQLITE_OPEN_READWRITE, NULL)
      != SQLITE_OK)
    die(db, argv[1]);
  check_store(db, argv[1]);
  exec(db, "PRAGMA journal_mode = WAL");
  exec(db, "PRAGMA synchronous = NORMAL");
  if (sqlite3_prepare_v2(db, insert_sql, -1, &ins, NULL) != SQLITE_OK)
    die(db, insert_sql);

  w0 = wall_seconds();
  c0 = clock();
  for (i = 1; i <= rows; i++) {
    int n;
    if ((i - 1) % per_txn == 0) exec(db, "BEGIN");
    n = snprintf(payload, sizeof payload,
                 "{\"n\":%ld,\"sku\":\"A-1\",\"qty\":3}", i);
    sqlite3_bind_int64(ins, 1, i);
    sqlite3_bind_text(ins, 2, "order.placed", 12, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 3, now_ms());
    sqlite3_bind_int(ins, 4, 2);
    sqlite3_bind_null(ins, 5);
    sqlite3_bind_null(ins, 6);
    sqlite3_bind_null(ins, 7);
    sqlite3_bind_null(ins, 8);
    sqlite3_bind_text(ins, 9, payload, n, SQLITE_STATIC);
    sqlite3_bind_int(ins, 10, 1);
    sqlite3_bind_null(ins, 11);
    if (sqlite3_step(ins) != SQLITE_DONE) die(db, "INSERT");
    sqlite3_reset(ins);
    if (i % per_txn == 0 || i == rows) exec(db, "COMMIT");
  }
  c1 = clock();
  w1 = wall_seconds();

  sqlite3_finalize(ins);
  if (sqlite3_close(db) != SQLITE_OK) die(db, "close");
  printf("rows=%ld wall=%.6f cpu=%.6f\n", rows, w1 - w0,
         (double)(c1 - c0) / CLOCKS_PER_SEC);
  return 0;
}
