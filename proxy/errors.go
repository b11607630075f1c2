package proxy

import (
	"bufio"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
)

// errorResponse is pgerror.Response.
func errorResponse(severity string, err error) *pgproto3.ErrorResponse {
	return pgerror.Response(severity, err)
}

// sendFatal writes a FATAL ErrorResponse for err and flushes. The caller
// closes the connection afterwards.
func sendFatal(w *bufio.Writer, err error) error {
	buf, encErr := errorResponse("FATAL", err).Encode(nil)
	if encErr != nil {
		return encErr
	}
	if _, werr := w.Write(buf); werr != nil {
		return werr
	}
	return w.Flush()
}
