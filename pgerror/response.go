package pgerror

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// Response builds the ErrorResponse a client sees for err, at severity: a
// PostgreSQL error from upstream passes through with its own code and text;
// an *Error anywhere in the chain gives its code and client-facing text;
// anything else becomes a generic internal error whose text stays in the
// logs.
func Response(severity string, err error) *pgproto3.ErrorResponse {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return &pgproto3.ErrorResponse{
			Severity: severity, SeverityUnlocalized: severity, Code: pgErr.Code,
			Message: pgErr.Message, Detail: pgErr.Detail, Hint: pgErr.Hint,
		}
	}
	pe := From(err)
	return &pgproto3.ErrorResponse{
		Severity: severity, SeverityUnlocalized: severity, Code: pe.Code,
		Message: pe.Message, Detail: pe.Detail, Hint: pe.Hint,
	}
}
