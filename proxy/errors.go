package proxy

import (
	"bufio"
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
)

// errorResponse builds the ErrorResponse for err, the one place where errors
// become what a client sees. A PostgreSQL error from upstream passes through
// with its own code and text; a *pgerror.Error anywhere in the chain gives its
// code and client-facing text; anything else becomes a generic internal error
// whose text stays in the logs.
func errorResponse(severity string, err error) *pgproto3.ErrorResponse {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return &pgproto3.ErrorResponse{
			Severity: severity, SeverityUnlocalized: severity, Code: pgErr.Code,
			Message: pgErr.Message, Detail: pgErr.Detail, Hint: pgErr.Hint,
		}
	}
	pe := pgerror.From(err)
	return &pgproto3.ErrorResponse{
		Severity: severity, SeverityUnlocalized: severity, Code: pe.Code,
		Message: pe.Message, Detail: pe.Detail, Hint: pe.Hint,
	}
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
