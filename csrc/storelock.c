/*
** storelock.c: one writer per store file, whatever path names it.
**
** A store is known by its file's identity (device and inode), never by
** the path string: a symlink, a hard link and "./x/../events.db" all name
** the same file, and a lock keyed on the string let a second writer in
** (ids collided and acknowledged events were lost). So:
**
** - The writer lock is flock(2) LOCK_EX on a descriptor of the database
**   file itself. flock locks belong to the open file description, so they
**   keep out a second process and a second open in this process alike,
**   and on Linux they do not mix with the POSIX (fcntl) locks SQLite
**   takes on the same file. They go when the process dies.
** - buzz__file_claim() also hands back the path SQLite is to open. SQLite
**   names the -wal and -shm files after the path it opens, so two names
**   of one file would each see a log of their own: a reader would miss
**   commits, and after a crash a writer under the other name would miss
**   the WAL's committed events and reuse their ids. So the path is the
**   file's canonical one (realpath(3), taken once the file exists), which
**   every symlink and "../" path shares; and because hard links have
**   canonical paths of their own, a writer records the path it opened in
**   the file's extended attribute user.buzz.path (it belongs to the inode,
**   so every link sees it), and every later open, by any name, opens that
**   path while it still names the file. Where the file system keeps no
**   extended attributes, a file with more than one link is refused.
**
** SQLite's POSIX-lock caveat: closing ANY descriptor of the database
** drops every POSIX lock this process holds on it, SQLite's included;
** another process may then take the file for its own (checkpoint and
** delete a WAL still in use). So this file opens at most one descriptor
** per database and process, shared by every store of the process open on
** that file, readers too, and closes it only after the last of them has
** closed its SQLite connections (buzz__file_release). A second writer in
** this process is refused from the table without opening anything. The
** table is process-wide state, like the locks it stands for (SQLite's
** unix VFS keeps its own inode table for the same reason), under one
** mutex.
**
** It does not know SQLite: store.c opens the connections.
*/
#define _DEFAULT_SOURCE 1     /* flock(), major(), minor() */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#define HOME_ATTR "user.buzz.path"
#endif

#include "store.h"

/*
** A database file some store of this process has open.
** CONSTRUCTOR: buzz__file_claim()   DESTRUCTOR: buzz__file_release(), at
** the last store's release.
*/
struct buzz_file {
  struct buzz_file *next;  /* link; the list is the process's (files) */
  dev_t dev;
  ino_t ino;
  int fd;                  /* owns; the one descriptor (see above) */
  int *extra;              /* owns; descriptors a rename race left us */
  size_t nextra;
  unsigned nopen;          /* stores of this process open on the file */
  unsigned is_writer : 1;  /* one of them writes: fd holds LOCK_EX */
};

static pthread_mutex_t files_mu = PTHREAD_MUTEX_INITIALIZER;
static buzz_file *files;   /* under files_mu */



static buzz_file *find(dev_t dev, ino_t ino) {
  buzz_file *f;
  for (f = files; f; f = f->next)
    if (f->dev == dev && f->ino == ino) return f;
  return NULL;
}

/*
** The pid holding a flock on dev/ino, from /proc/locks (Linux), or 0 when
** it cannot be told. Only for the message: the lock is what counts.
*/
static long holder_pid(dev_t dev, ino_t ino) {
#if defined(__linux__)
  FILE *fp = fopen("/proc/locks", "re");
  char line[256];
  long pid = 0;
  if (fp == NULL) return 0;
  while (pid == 0 && fgets(line, sizeof line, fp)) {
    unsigned maj, mnr;
    unsigned long long lino;
    long p;
    char kind[16];
    if (sscanf(line, "%*d: %15s %*s %*s %ld %x:%x:%llu", kind, &p, &maj, &mnr,
               &lino) == 5 && strcmp(kind, "FLOCK") == 0 &&
        maj == major(dev) && mnr == minor(dev) && lino == (unsigned long long)ino)
      pid = p;
  }
  fclose(fp);
  return pid;
#else
  (void)dev;
  (void)ino;
  return 0;
#endif
}

/* Takes the writer lock of f for this store; 0 or BUZZ_ELOCKED. */
static int lock(buzz_file *f, const char *path, char *err, size_t errlen) {
  buzz_file *g;
  long pid;
  for (g = files; g; g = g->next)     /* two entries after a rename race */
    if (g->dev == f->dev && g->ino == f->ino && g->is_writer) {
      buzz__set_err(err, errlen, "%s is locked by another writer (pid %ld) in "
              "this process: close that bus first (two buses may read one "
              "store, only one may write it)", path, (long)getpid());
      return BUZZ_ELOCKED;
    }
  if (flock(f->fd, LOCK_EX | LOCK_NB) == 0) {
    f->is_writer = 1;
    return BUZZ_OK;
  }
  if (errno != EWOULDBLOCK) {
    buzz__set_err(err, errlen, "%s: cannot lock it for writing: %s", path,
            strerror(errno));
    return BUZZ_ESTORE;
  }
  pid = holder_pid(f->dev, f->ino);
  if (pid > 0)
    buzz__set_err(err, errlen, "%s is locked by another writer (pid %ld) (two "
            "processes may read one store, only one may write it)", path,
            pid);
  else
    buzz__set_err(err, errlen, "%s is locked by another writer (two processes "
            "may read one store, only one may write it)", path);
  return BUZZ_ELOCKED;
}

/* Closes f's descriptors and frees it; f is out of the list. */
static void file_free(buzz_file *f) {
  size_t i;
  for (i = 0; i < f->nextra; i++) close(f->extra[i]);
  free(f->extra);
  close(f->fd);
  free(f);
}

/*
** Opens path (creating it for a writer) and finds or makes its entry.
** Under files_mu. 0 with *out, or BUZZ_ESTORE/BUZZ_ENOMEM with err.
*/
static int open_entry(const char *path, int is_writer, buzz_file **out,
                      char *err, size_t errlen) {
  struct stat sb;
  buzz_file *f;
  int fd;
  if (stat(path, &sb) == 0 && (f = find(sb.st_dev, sb.st_ino)) != NULL) {
    *out = f;                          /* no second descriptor: see above */
    return BUZZ_OK;
  }
  fd = open(path, O_RDONLY | O_CLOEXEC | (is_writer ? O_CREAT : 0), 0644);
  if (fd < 0 || fstat(fd, &sb) != 0) {
    buzz__set_err(err, errlen, "%s: cannot %s it: %s", path,
            is_writer ? "open or create" : "open", strerror(errno));
    if (fd >= 0) close(fd);            /* never a database: fstat failed */
    return BUZZ_ESTORE;
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);                         /* not a database file either */
    buzz__set_err(err, errlen, "%s is not a regular file: give the path of a "
            "store file", path);
    return BUZZ_ESTORE;
  }
  if ((f = find(sb.st_dev, sb.st_ino)) != NULL) {
    /* renamed in between onto a file we have open: keep fd till the end */
    int *x = realloc(f->extra, (f->nextra + 1) * sizeof *x);
    if (x == NULL) {
      close(fd);        /* out of memory: the lesser harm is to close it */
      return BUZZ_ENOMEM;
    }
    f->extra = x;
    f->extra[f->nextra++] = fd;
    *out = f;
    return BUZZ_OK;
  }
  if ((f = calloc(1, sizeof *f)) == NULL) {
    close(fd);                         /* no store of ours has it open */
    return BUZZ_ENOMEM;
  }
  f->dev = sb.st_dev;
  f->ino = sb.st_ino;
  f->fd = fd;
  f->next = files;
  files = f;
  *out = f;
  return BUZZ_OK;
}

/*
** The path the last writer of f opened it by (its user.buzz.path), if it
** still names f: malloc'd, or NULL. *is_unsupported is set when the file
** system keeps no extended attributes.
*/
static char *home_of(const buzz_file *f, int *is_unsupported) {
#if defined(HOME_ATTR)
  char buf[PATH_MAX];
  struct stat sb;
  ssize_t n = fgetxattr(f->fd, HOME_ATTR, buf, sizeof buf - 1);
  char *home;
  *is_unsupported = n < 0 && errno == ENOTSUP;
  if (n <= 0) return NULL;
  buf[n] = '\0';
  if (strlen(buf) != (size_t)n || buf[0] != '/' || stat(buf, &sb) != 0 ||
      sb.st_dev != f->dev || sb.st_ino != f->ino)
    return NULL;                       /* moved, or another file now */
  if ((home = malloc((size_t)n + 1)) != NULL) memcpy(home, buf, (size_t)n + 1);
  return home;
#else
  (void)f;
  *is_unsupported = 1;
  return NULL;
#endif
}

/* Records real as the path writers of f open it by; 0, or -1 when the
** file system keeps no extended attributes. */
static int set_home(const buzz_file *f, const char *real) {
#if defined(HOME_ATTR)
  if (fsetxattr(f->fd, HOME_ATTR, real, strlen(real), 0) == 0) return 0;
  return errno == ENOTSUP ? -1 : 0;    /* else: a reader still gets by */
#else
  (void)f;
  (void)real;
  return -1;
#endif
}

/*
** The path SQLite is to open for f (which exists now), malloc'd in *real:
** the recorded home path while it names f, else the canonical path (see
** the top of the file). A writer records it.
*/
static int resolve(const buzz_file *f, const char *path, int is_writer,
                   char **real, char *err, size_t errlen) {
  struct stat sb;
  int is_unsupported = 0;
  char *r = home_of(f, &is_unsupported);
  if (r == NULL) {
    if ((r = realpath(path, NULL)) == NULL) {
      buzz__set_err(err, errlen, "%s: cannot resolve its path: %s", path,
              strerror(errno));
      return BUZZ_ESTORE;
    }
    if (stat(r, &sb) != 0 || sb.st_dev != f->dev || sb.st_ino != f->ino) {
      free(r);
      buzz__set_err(err, errlen, "%s was replaced while it was being opened; "
              "open it again", path);
      return BUZZ_ESTORE;
    }
    if (is_writer && set_home(f, r) < 0) is_unsupported = 1;
  }
  if (is_unsupported && fstat(f->fd, &sb) == 0 && sb.st_nlink > 1) {
    free(r);
    buzz__set_err(err, errlen, "%s has %lu hard links, and its file system keeps "
            "no extended attributes to tell which name holds its WAL; "
            "remove the other links (a symlink is fine)", path,
            (unsigned long)sb.st_nlink);
    return BUZZ_ESTORE;
  }
  *real = r;
  return BUZZ_OK;
}

int buzz__file_claim(const char *path, int is_writer, buzz_file **out,
                     char **real, char *err, size_t errlen) {
  buzz_file *f;
  int rc;
  *out = NULL;
  *real = NULL;
  pthread_mutex_lock(&files_mu);
  if ((rc = open_entry(path, is_writer, &f, err, errlen)) < 0) goto done;
  f->nopen++;                          /* from here release() undoes it */
  if (is_writer && (rc = lock(f, path, err, errlen)) < 0) {
    pthread_mutex_unlock(&files_mu);
    buzz__file_release(f, 0);
    return rc;
  }
  if ((rc = resolve(f, path, is_writer, real, err, errlen)) < 0) {
    pthread_mutex_unlock(&files_mu);
    buzz__file_release(f, is_writer);
    return rc;
  }
  *out = f;
done:
  pthread_mutex_unlock(&files_mu);
  return rc;
}

void buzz__file_release(buzz_file *f, int is_writer) {
  buzz_file **p;
  if (f == NULL) return;
  pthread_mutex_lock(&files_mu);
  if (is_writer && f->is_writer) {
    f->is_writer = 0;
    flock(f->fd, LOCK_UN);
  }
  if (--f->nopen == 0) {
    for (p = &files; *p != f; p = &(*p)->next) {}
    *p = f->next;
    file_free(f);
  }
  pthread_mutex_unlock(&files_mu);
}
