// Package wire is the PostgreSQL message framing and socket plumbing that
// both sides of pgwarden share: package proxy (the client side) and package
// pool (the server side). It knows the frame — a 1-byte type, a 4-byte
// length, the body — and nothing of what a message means.
//
//   - FrameCopier relays messages from one buffered stream to another as raw
//     bytes, without allocating, and never loses its place in a message: a
//     read deadline that interrupts it part-way is retried where it stopped.
//   - ReadMessage reads one whole message, its length capped before anything
//     is allocated, for the handshake and pgwarden's own exchanges.
//   - DeadlineWriter bounds every write to a connection, so a peer that
//     stops reading frees what its session holds.
//   - WithRawIO makes a plain TCP or unix socket's reads and writes raw
//     system calls (a relay sits idle between every two messages, and the
//     first ordinary system call after an idle moment wakes the Go runtime's
//     monitor thread: two context switches per round trip).
//   - Parker holds idle sockets without a goroutine each (Linux: an epoll
//     set of its own, one-shot registrations): the owner's wake function
//     runs in a new goroutine when the socket is readable or Wake is called,
//     once. Idle clients then cost their heap state, not a stack.
//   - PeekClosed looks at an idle socket, without reading, for a peer that
//     has closed it or sent something.
//
// Ownership: wire owns nothing but a parked connection, from Park until its
// wake function starts (then the goroutine it runs in owns it). Every other
// value works on a connection or buffer its caller owns, and each is used by one goroutine at a time (a
// connection from WithRawIO allows one reader and one writer at once). It
// imports nothing of pgwarden's.
package wire
