/*
** storewal.c: keeps a store's WAL short without stalling its commits.
**
** Left to itself, SQLite checkpoints inside the commit that takes the WAL
** past 1000 pages: that commit copies the WAL into the database file and
** fsyncs it, and every event behind it waits (p99.9 publish-to-handler
** spikes of 4-16 ms at 10k events/s). Here the writer's connection has
** wal_autocheckpoint = 0, and a thread of its own, on a connection of its
** own, checkpoints instead:
**
** - PASSIVE as soon as a commit leaves WAL_PAGES pages or more in the WAL
**   (the writer's WAL hook says so): it copies what no reader still
**   needs and fsyncs the database, never takes the write lock and never
**   waits, so commits go on meanwhile and the database file stays close
**   behind the WAL.
** - SQLite rewinds the WAL to its start only at a commit that finds every
**   frame copied, and under a steady stream of commits the checkpointer
**   never quite catches up. So once the WAL passes REWIND_PAGES pages
**   (64 MiB of 4 KiB pages), the writer copies the last few frames itself
**   between two groups (buzz__wal_catch_up: one small checkpoint and its
**   fsyncs, rarely: every 64 MiB of WAL), and its next commit rewinds the
**   WAL; journal_size_limit keeps the file from growing past that. So the
**   WAL stays bounded however long the writer runs, as long as no reader
**   holds an old snapshot for as long.
** - TRUNCATE when the writer has been idle for IDLE_MS with frames in the
**   WAL, with no busy wait (a reader in the way makes it a PASSIVE one):
**   the WAL goes back to zero bytes between bursts.
**
** It knows nothing of events: store.c owns the writer connection, starts
** this thread once the database is in WAL mode and stops it before it
** closes that connection.
*/
#include <stdlib.h>

#include <sqlite3.h>
#include <uv.h>

#include "store.h"

#define WAL_PAGES 1000          /* SQLite's own autocheckpoint default */
#define REWIND_PAGES 4000       /* the writer's turn: rewind the WAL */
#define IDLE_MS 1000            /* idle writer: truncate the WAL */
#define WAL_KEEP "16777216"     /* bytes a rewound WAL file keeps */

/*
** The checkpointer of one store.
** CONSTRUCTOR: buzz__wal_start()   DESTRUCTOR: buzz__wal_stop()
*/
struct buzz_wal {
  sqlite3 *wdb;              /* borrows: the writer's, for its hook */
  sqlite3 *db;               /* owns; used by the thread only */
  uv_thread_t thread;
  uv_mutex_t mu;
  uv_cond_t cond;            /* a checkpoint is due, or stop */
  /* under mu */
  int64_t commits;           /* commits the hook saw */
  int pages;                 /* in the WAL after the last commit */
  int next_at;               /* pages that make the next PASSIVE due */
  int64_t checkpoints;       /* checkpoints run */
  unsigned is_due : 1;       /* pages >= WAL_PAGES */
  unsigned is_behind : 1;    /* a checkpoint left frames: the writer's turn */
  unsigned is_stopping : 1;
};

/* The writer's WAL hook, on the writer thread after each commit. */
static int on_commit(void *arg, sqlite3 *db, const char *name, int pages) {
  buzz_wal *w = arg;
  int was_empty;
  (void)db;
  (void)name;
  uv_mutex_lock(&w->mu);
  was_empty = w->pages == 0;
  if (pages < w->pages) w->next_at = WAL_PAGES;     /* rewound */
  w->pages = pages;
  w->commits++;
  if (pages >= w->next_at && !w->is_due) {
    w->next_at = pages + WAL_PAGES;    /* one checkpoint per WAL_PAGES */
    w->is_due = 1;
    uv_cond_signal(&w->cond);
  } else if (was_empty) {
    uv_cond_signal(&w->cond);          /* start timing the idle spell */
  }
  uv_mutex_unlock(&w->mu);
  return SQLITE_OK;
}

static void wal_main(void *arg) {
  buzz_wal *w = arg;
  uv_mutex_lock(&w->mu);
  while (!w->is_stopping) {
    int mode = SQLITE_CHECKPOINT_PASSIVE, rc;
    if (!w->is_due) {
      int64_t seen = w->commits;
      if (w->pages == 0) {
        uv_cond_wait(&w->cond, &w->mu);
        continue;
      }
      if (uv_cond_timedwait(&w->cond, &w->mu,
                            (uint64_t)IDLE_MS * 1000000u) == 0 ||
          w->is_stopping || w->is_due || w->commits != seen)
        continue;                      /* woken, or not idle after all */
      mode = SQLITE_CHECKPOINT_TRUNCATE;
    }
    w->is_due = 0;
    uv_mutex_unlock(&w->mu);
    rc = sqlite3_wal_checkpoint_v2(w->db, NULL, mode, NULL, NULL);
    uv_mutex_lock(&w->mu);
    w->checkpoints++;
    if (mode == SQLITE_CHECKPOINT_PASSIVE) w->is_behind = 1;
    (void)rc;
    if (mode == SQLITE_CHECKPOINT_TRUNCATE && rc == SQLITE_OK) {
      w->pages = 0;
      w->next_at = WAL_PAGES;
    }
  }
  uv_mutex_unlock(&w->mu);
}

int buzz__wal_start(buzz_wal **out, struct sqlite3 *wdb, const char *file) {
  buzz_wal *w = calloc(1, sizeof *w);
  *out = NULL;
  if (w == NULL) return BUZZ_ENOMEM;
  if (uv_mutex_init(&w->mu) != 0) {
    free(w);
    return BUZZ_ENOMEM;
  }
  if (uv_cond_init(&w->cond) != 0) {
    uv_mutex_destroy(&w->mu);
    free(w);
    return BUZZ_ENOMEM;
  }
  w->wdb = wdb;
  w->next_at = WAL_PAGES;
  if (sqlite3_open_v2(file, &w->db, SQLITE_OPEN_READWRITE |
                      SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK ||
      sqlite3_exec(w->db, "PRAGMA wal_autocheckpoint = 0", NULL, NULL,
                   NULL) != SQLITE_OK ||
      /* a first read opens the WAL: till then a checkpoint is a no-op */
      sqlite3_exec(w->db, "SELECT count(*) FROM sqlite_schema", NULL, NULL,
                   NULL) != SQLITE_OK ||
      sqlite3_exec(wdb, "PRAGMA journal_size_limit = " WAL_KEEP, NULL, NULL,
                   NULL) != SQLITE_OK ||
      uv_thread_create(&w->thread, wal_main, w) != 0) {
    sqlite3_close(w->db);
    uv_cond_destroy(&w->cond);
    uv_mutex_destroy(&w->mu);
    free(w);
    return BUZZ_ESTORE;
  }
  sqlite3_wal_hook(wdb, on_commit, w);  /* also ends autocheckpoints */
  *out = w;
  return BUZZ_OK;
}

void buzz__wal_stop(buzz_wal *w) {
  if (w == NULL) return;
  uv_mutex_lock(&w->mu);
  w->is_stopping = 1;
  uv_cond_signal(&w->cond);
  uv_mutex_unlock(&w->mu);
  uv_thread_join(&w->thread);
  sqlite3_wal_hook(w->wdb, NULL, NULL);
  sqlite3_close(w->db);
  uv_cond_destroy(&w->cond);
  uv_mutex_destroy(&w->mu);
  free(w);
}

int64_t buzz__wal_checkpoints(buzz_wal *w) {
  int64_t n;
  if (w == NULL) return 0;
  uv_mutex_lock(&w->mu);
  n = w->checkpoints;
  uv_mutex_unlock(&w->mu);
  return n;
}

void buzz__wal_catch_up(buzz_wal *w) {
  int is_behind;
  if (w == NULL) return;
  uv_mutex_lock(&w->mu);
  is_behind = w->is_behind && w->pages >= REWIND_PAGES;
  if (is_behind) w->is_behind = 0;
  uv_mutex_unlock(&w->mu);
  if (is_behind &&
      sqlite3_wal_checkpoint_v2(w->wdb, NULL, SQLITE_CHECKPOINT_PASSIVE,
                                NULL, NULL) != SQLITE_OK) {
    uv_mutex_lock(&w->mu);             /* the checkpointer is at it: later */
    w->is_behind = 1;
    uv_mutex_unlock(&w->mu);
  }
}
