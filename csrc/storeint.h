/*
** storeint.h: the store's insides, shared by its two files and by no one
** else: store.c (open, close, the writer thread, appends) and
** storeread.c (the loop thread's reads on the read-only connection).
** Everything else sees buzz_store through buzz.h only.
*/
#ifndef BUZZ_STOREINT_H
#define BUZZ_STOREINT_H

#include <sqlite3.h>
#include <uv.h>

#include "store.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

/*
** Queries (buzz__store_query) come in shapes: which of the optional
** filters they have, one bit each. Each shape has a statement of its own
** with only its own conditions, so a row is tested for what was asked and
** nothing else, and an upper id bound ends the rowid range (a statement
** with "?2 IS NULL OR id <= ?2" walked on to the end of the log).
*/
enum { Q_TO_ID = 1, Q_FROM_TS = 2, Q_TO_TS = 4, Q_KEY = 8, Q_PATTERN = 16,
       Q_SHAPES = 32 };

typedef struct failure {
  struct failure *next;
  char *msg;                 /* owns */
  int64_t lo, hi;            /* event ids lost; 0 if none */
} failure;

struct buzz_store {
  /* set at open, read-only after */
  buzz_store_opts o;
  char *path;                /* owns; as given, for messages */
  char *file;                /* owns; canonical, what SQLite opens */
  buzz_file *fid;            /* owns a claim; the writer lock if a writer */
  int64_t last_id;           /* max(id) at open (and, for a writer, the
                                highest id an earlier session reserved) */
  buzz_ids *ids;             /* owns; the id reservation, NULL for readers */
  /* loop thread only */
  sqlite3 *rdb;              /* owns; read-only connection */
  sqlite3_stmt *q_stmts[Q_SHAPES];  /* owns; one per shape of filters */
  sqlite3_stmt *q_stmt;      /* borrows one of them: the current page */
  int has_streams;           /* events has the stream columns (a store
                                an older buzz made, read-only, has not) */
  int64_t appended_seq;      /* rows handed to the writer */
  /* writer thread only */
  sqlite3 *wdb;              /* owns; read-write connection */
  sqlite3_stmt *ins, *ack, *drop;
  sqlite3_stmt *put, *del;   /* state rows */
  int64_t last_retain;
  char full_msg[200];        /* why room_for() refused the last group */
  buzz_wal *wal;             /* owns; the checkpointer (storewal.c) */
  /* shared, under mu */
  uv_mutex_t mu;
  uv_cond_t work;            /* writer: rows queued or stop */
  uv_cond_t done;            /* waiters: a group finished, or room */
  buzz_row *head, *tail;     /* owns the queued rows */
  size_t nqueued;
  int64_t qbytes;            /* bytes of rows queued or in flight */
  int64_t done_seq;          /* rows finished (committed or failed) */
  int64_t committed_id;
  failure *fails, *fails_tail;  /* owns; unreported failures */
  buzz_store_stats st;
  int is_stopping;           /* under mu */
  int has_thread;            /* set before the thread starts */
  uv_thread_t thread;
};

/* "path: SQLite's message for db" (or "cannot open") into err. */
void buzz__store_db_err(char *err, size_t errlen, const buzz_store *s,
                        sqlite3 *db);

/* Bytes on disk of the database and its WAL (the WAL's in *wal). */
int64_t buzz__store_file_bytes(const buzz_store *s, int64_t *wal);

/* The first column of sql's first row (0 if none), with up to two integer
** parameters; *rc is SQLITE_OK or the error. */
int64_t buzz__store_query_int(sqlite3 *db, const char *sql, int nargs,
                              int64_t a, int64_t b, int *rc);

/* Binds v (NULL when v.p is) as text, without copying it. */
int buzz__store_bind_str(sqlite3_stmt *st, int i, buzz_str v);

/* sqlite3_exec(db, sql) without callback or message: the SQLite code. */
int buzz__store_exec(sqlite3 *db, const char *sql);

/* The writer thread's body (store.c); storeopen.c starts it with s. */
void buzz__store_writer_main(void *arg);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
