package proxy

import (
	"container/list"
	"encoding/binary"
	"strconv"
	"sync"
)

// Named prepared statements in transaction mode.
//
// A client's named statement must survive its moves between servers. As in
// PgBouncer 1.21 and PgDog, statements are keyed by what PostgreSQL parses —
// the query text and the parameter type OIDs, never the text alone — and
// each distinct key gets a server-side name, pgwarden_<n>, that is never
// reused. A client maps its own names to those entries; each server keeps an
// LRU of the entries it has prepared, bounded by MaxPreparedStatements. On
// the way to a server:
//
//   - Parse of a named statement is sent under the server-side name. When
//     the server has it already, a Close of that name goes first (its
//     CloseComplete is not forwarded), so the client gets PostgreSQL's own
//     ParseComplete or error for its Parse.
//   - Bind and Describe of a named statement the server lacks get a Parse in
//     front, whose ParseComplete is not forwarded; the name is rewritten.
//   - Close of a named statement drops the client's mapping; the server keeps
//     the statement for others, and is sent a Close of a name that never
//     exists, so the client still gets PostgreSQL's CloseComplete in order.
//   - DEALLOCATE name, DEALLOCATE ALL and DISCARD ALL drop the client's
//     mappings (DEALLOCATE is sent as DEALLOCATE ALL, which also empties the
//     server's cache).
//
// Replies are matched to requests in order: each Parse and Close sent is
// queued with whether its reply is the client's; an ErrorResponse drops
// what the server will now skip up to the next Sync (and the statements
// those Parses would have made). A server whose statements pgwarden can no
// longer account for (26000 or 0A000 from PostgreSQL, or a dropped Close) is
// reset with DISCARD ALL before its next client.

// stmtEntry is one distinct statement: what PostgreSQL parses, and the Parse
// message that prepares it under its server-side name.
type stmtEntry struct {
	id      uint64
	name    string   // pgwarden_<id>
	parse   []byte   // a whole Parse message for name
	flags   sqlFlags // what its SQL does (scanSQL): a Bind of one that changes session state marks its server
	refs    int      // client mappings; guarded by stmtRegistry.mu
	private bool     // not in byKey: one client's second name for a statement in use
}

// stmtRegistry gives each distinct statement its entry, shared by clients.
// An entry leaves it when no client maps a name to it; servers that still
// have it prepared keep it until their LRU drops it, harmlessly, since its
// name is never given again.
type stmtRegistry struct {
	mu     sync.Mutex
	byKey  map[string]*stmtEntry
	nextID uint64
}

func newStmtRegistry() *stmtRegistry { return &stmtRegistry{byKey: map[string]*stmtEntry{}} }

// acquire returns the entry for a Parse body's key (query and parameter
// types, the body after the statement name) with one more reference. The
// key is copied: body aliases a reader's buffer.
func (r *stmtRegistry) acquire(key []byte, flags sqlFlags) *stmtEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.byKey[string(key)]; e != nil {
		e.refs++
		return e
	}
	e := r.newLocked(key, flags)
	r.byKey[string(key)] = e
	return e
}

// private returns a new entry for key that no other Parse will share.
func (r *stmtRegistry) private(key []byte, flags sqlFlags) *stmtEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.newLocked(key, flags)
	e.private = true
	return e
}

func (r *stmtRegistry) newLocked(key []byte, flags sqlFlags) *stmtEntry {
	r.nextID++
	e := &stmtEntry{id: r.nextID, name: "pgwarden_" + strconv.FormatUint(r.nextID, 10), refs: 1, flags: flags}
	e.parse = make([]byte, 0, headerLen+len(e.name)+1+len(key))
	e.parse = append(e.parse, 'P', 0, 0, 0, 0)
	e.parse = append(e.parse, e.name...)
	e.parse = append(e.parse, 0)
	e.parse = append(e.parse, key...)
	binary.BigEndian.PutUint32(e.parse[1:], uint32(len(e.parse)-1))
	return e
}

// release drops a reference.
func (r *stmtRegistry) release(e *stmtEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.refs--; e.refs <= 0 && !e.private {
		key := e.parse[headerLen+len(e.name)+1:]
		if r.byKey[string(key)] == e {
			delete(r.byKey, string(key))
		}
	}
}

// size is the number of entries, for tests and SHOW.
func (r *stmtRegistry) size() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.byKey)
}

// stmtCache is what one server has prepared, most recently used first.
// Owned by whoever holds the server (one client at a time).
type stmtCache struct {
	max  int
	lru  *list.List // of *stmtEntry
	byID map[uint64]*list.Element
}

func newStmtCache(max int) *stmtCache {
	return &stmtCache{max: max, lru: list.New(), byID: map[uint64]*list.Element{}}
}

// has reports whether e is prepared, and marks it used.
func (c *stmtCache) has(e *stmtEntry) bool {
	el := c.byID[e.id]
	if el != nil {
		c.lru.MoveToFront(el)
	}
	return el != nil
}

// add records e as prepared and returns the entry that must be closed to
// make room, if any: the least recently used that inUse does not claim (a
// portal may still use those; when all are, the cache grows past max for
// now).
func (c *stmtCache) add(e *stmtEntry, inUse func(*stmtEntry) bool) (evict *stmtEntry) {
	if _, ok := c.byID[e.id]; ok {
		return nil
	}
	if c.lru.Len() >= c.max {
		for el := c.lru.Back(); el != nil; el = el.Prev() {
			if old := el.Value.(*stmtEntry); !inUse(old) {
				evict = c.lru.Remove(el).(*stmtEntry)
				delete(c.byID, evict.id)
				break
			}
		}
	}
	c.byID[e.id] = c.lru.PushFront(e)
	return evict
}

// remove forgets e (its Parse failed or was skipped).
func (c *stmtCache) remove(e *stmtEntry) {
	if el := c.byID[e.id]; el != nil {
		c.lru.Remove(el)
		delete(c.byID, e.id)
	}
}

// clear forgets everything (DISCARD ALL, DEALLOCATE ALL).
func (c *stmtCache) clear() {
	c.lru.Init()
	clear(c.byID)
}

func (c *stmtCache) len() int { return c.lru.Len() }
