/*
** jsonint.h: what json.c, jsonenc.c and jsondec.c share and nobody else
** sees: the limits, the box that owns a call's malloc'd memory, and the
** integer printer. lbuzz.c includes json.h only.
*/
#ifndef BUZZ_JSONINT_H
#define BUZZ_JSONINT_H

#include <cjson/cJSON.h>

#include "json.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

#define JSON_MAX_DEPTH  1000                   /* cJSON's parse limit */
#define JSON_MAX_SAFE   9007199254740991.0     /* 2^53 - 1 */

/*
** Owner of the malloc'd memory of one call, so a raise cannot leak it.
** CONSTRUCTOR: buzz__json_box_acquire()   DESTRUCTOR: box_gc() (the collector)
*/
typedef struct json_box {
  cJSON *tree;   /* owns; NULL between calls */
  char *text;    /* owns (cJSON_PrintUnformatted); NULL between calls */
  int busy;      /* 1 while a call uses the box */
  char small[1024];  /* the text when it fits: no malloc */
} json_box;

/*
** Pushes a box for one call and marks it busy (the shared one when idle,
** else a fresh one registered in its place). Raises only on memory
** errors. _release frees what it owns and lets the next call have it;
** _drop only frees (before a message is built). Never raise.
*/
json_box *buzz__json_box_acquire(lua_State *L);
void buzz__json_box_release(json_box *b);
void buzz__json_box_drop(json_box *b);

/* Leaves only the value on top of the stack above top (the result or the
** message of a call that pushed a box at top + 1). */
void buzz__json_settle(lua_State *L, int top);

/* Writes v in decimal into buf (at least 21 bytes); returns its length. */
int buzz__json_int_text(char *buf, long long v);

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
