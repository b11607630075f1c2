package wire

import "errors"

// ErrUnexpectedData is an idle connection whose peer has sent something
// nobody asked for (PeekClosed).
var ErrUnexpectedData = errors.New("idle connection has unread data")
