package pool

import (
	"container/list"
	"encoding/binary"
	"strconv"
	"sync"

	"github.com/pgwarden/pgwarden/wire"
)

// Named prepared statements in transaction mode.
//
// A client's named statement must survive its moves between servers. As in
// PgBouncer 1.21 and PgDog, statements are keyed by what PostgreSQL parses —
// the query text and the parameter type OIDs, never the text alone — and
// each distinct key gets a server-side name, pgwarden_<n>, that is never
// reused. A client maps its own names to those entries; each server keeps an
// LRU of the entries it has prepared, bounded by MaxPreparedStatements. This
// package keeps the entries (StmtRegistry) and each server's LRU
// (StmtCache); package proxy's transaction mode rewrites the messages. On
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

// StmtEntry is one distinct statement: what PostgreSQL parses, and the Parse
// message that prepares it under its server-side name. Its exported fields
// do not change after the registry made it.
type StmtEntry struct {
	ID    uint64
	Name  string // pgwarden_<id>
	Parse []byte // a whole Parse message for Name
	// Flags are the creator's, opaque here: proxy's scan of its SQL (a Bind
	// of one that changes session state marks its server).
	Flags   uint16
	refs    int  // client mappings; guarded by StmtRegistry.mu
	private bool // not in byKey: one client's second name for a statement in use
}

// StmtRegistry gives each distinct statement its entry, shared by clients.
// An entry leaves it when no client maps a name to it; servers that still
// have it prepared keep it until their LRU drops it, harmlessly, since its
// name is never given again. It is safe for concurrent use.
type StmtRegistry struct {
	mu     sync.Mutex
	byKey  map[string]*StmtEntry // guarded by mu
	nextID uint64                // guarded by mu
}

// NewStmtRegistry returns an empty registry.
func NewStmtRegistry() *StmtRegistry { return &StmtRegistry{byKey: map[string]*StmtEntry{}} }

// Acquire returns the entry for a Parse body's key (query and parameter
// types, the body after the statement name) with one more reference. The
// key is copied: body aliases a reader's buffer.
func (r *StmtRegistry) Acquire(key []byte, flags uint16) *StmtEntry {
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

// Private returns a new entry for key, with one reference, that no other
// Parse will share.
func (r *StmtRegistry) Private(key []byte, flags uint16) *StmtEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.newLocked(key, flags)
	e.private = true
	return e
}

func (r *StmtRegistry) newLocked(key []byte, flags uint16) *StmtEntry {
	r.nextID++
	e := &StmtEntry{ID: r.nextID, Name: "pgwarden_" + strconv.FormatUint(r.nextID, 10), refs: 1, Flags: flags}
	e.Parse = make([]byte, 0, wire.HeaderLen+len(e.Name)+1+len(key))
	e.Parse = append(e.Parse, 'P', 0, 0, 0, 0)
	e.Parse = append(e.Parse, e.Name...)
	e.Parse = append(e.Parse, 0)
	e.Parse = append(e.Parse, key...)
	binary.BigEndian.PutUint32(e.Parse[1:], uint32(len(e.Parse)-1))
	return e
}

// Release drops a reference.
func (r *StmtRegistry) Release(e *StmtEntry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.refs--; e.refs <= 0 && !e.private {
		key := e.Parse[wire.HeaderLen+len(e.Name)+1:]
		if r.byKey[string(key)] == e {
			delete(r.byKey, string(key))
		}
	}
}

// Size is the number of entries, for tests and SHOW.
func (r *StmtRegistry) Size() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.byKey)
}

// StmtCache is what one server has prepared, most recently used first.
// Owned by whoever holds the server (one client at a time); not safe for
// concurrent use.
type StmtCache struct {
	max  int
	lru  *list.List // of *StmtEntry
	byID map[uint64]*list.Element
}

// NewStmtCache returns an empty cache that keeps max statements (see Add).
func NewStmtCache(max int) *StmtCache {
	return &StmtCache{max: max, lru: list.New(), byID: map[uint64]*list.Element{}}
}

// Has reports whether e is prepared, and marks it used.
func (c *StmtCache) Has(e *StmtEntry) bool {
	el := c.byID[e.ID]
	if el != nil {
		c.lru.MoveToFront(el)
	}
	return el != nil
}

// Add records e as prepared and returns the entry that must be closed to
// make room, if any: the least recently used that inUse does not claim (a
// portal may still use those; when all are, the cache grows past max for
// now).
func (c *StmtCache) Add(e *StmtEntry, inUse func(*StmtEntry) bool) (evict *StmtEntry) {
	if _, ok := c.byID[e.ID]; ok {
		return nil
	}
	if c.lru.Len() >= c.max {
		for el := c.lru.Back(); el != nil; el = el.Prev() {
			if old := el.Value.(*StmtEntry); !inUse(old) {
				evict = c.lru.Remove(el).(*StmtEntry)
				delete(c.byID, evict.ID)
				break
			}
		}
	}
	c.byID[e.ID] = c.lru.PushFront(e)
	return evict
}

// Remove forgets e (its Parse failed or was skipped).
func (c *StmtCache) Remove(e *StmtEntry) {
	if el := c.byID[e.ID]; el != nil {
		c.lru.Remove(el)
		delete(c.byID, e.ID)
	}
}

// Clear forgets everything (DISCARD ALL, DEALLOCATE ALL).
func (c *StmtCache) Clear() {
	c.lru.Init()
	clear(c.byID)
}

// Len is the number of statements prepared.
func (c *StmtCache) Len() int { return c.lru.Len() }
