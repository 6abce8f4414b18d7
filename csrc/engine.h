/*
** engine.h: the bus's engine state in plain C, and the two files that
** work on it without Lua: engine.c (the publish pipeline: dedup check,
** id reservation, append to the store, queue; the writer's news and the
** commit gate) and consumer.c (durable consumers' positions and pages).
** lcore.h embeds a buzz_engine in the core object; the binding files
** (l*.c) read Lua values, keep refs and push results, and call these
** for the rest. The same rules as buzz.h's: 0 or a negative BUZZ_E*
** code, buzz__ names, no Lua header.
*/
#ifndef BUZZ_ENGINE_H
#define BUZZ_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "store.h"

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility push(hidden)
#endif

#define BUZZ_ERR_MAX 512   /* bytes of the err buffers these functions
                              fill (always terminated) */

/*
** What a bus is made of below Lua: the dispatcher, the store, the dedup
** keys and the numbers that tie the queue to the writer's commits.
** CONSTRUCTOR: lcore_new() in lbuzz.c (bus_init, then ldurable.c's
** open_store)   DESTRUCTOR: lcore_close() in lbuzz.c
*/
typedef struct buzz_engine {
  buzz_bus bus;        /* owns; embedded */
  buzz_store *store;   /* owns; NULL for a memory bus or once closed */
  buzz_dedup *dedup;   /* owns; NULL until the first dedup key */
  int64_t dedup_window;/* ms */
  int durability;      /* BUZZ_DUR_* */
  int64_t gate_id;     /* the highest queued id that must be committed */
  int64_t committed;   /* before delivery, and the committed id last seen */
  int64_t appended_id; /* the last event id handed to the writer */
  int64_t id_safe;     /* ids up to this are reserved in the store: */
                       /* no word with it needed (buzz__ids_take) */
  size_t ndurable;     /* live durable subs */
} buzz_engine;

#if defined(__GNUC__) && !defined(_WIN32)
#pragma GCC visibility pop
#endif

#endif
