package objstore

import (
	"context"

	"github.com/aws/smithy-go/middleware"
)

// countRequests counts every attempt the SDK sends: the middleware sits after the retry
// middleware in the finalize step, so each retry is counted as the request it is.
func countRequests(s *Stats) func(*middleware.Stack) error {
	return func(st *middleware.Stack) error {
		return st.Finalize.Add(middleware.FinalizeMiddlewareFunc("casnixCountRequests",
			func(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (middleware.FinalizeOutput, middleware.Metadata, error) {
				s.Requests.Add(1)
				return next.HandleFinalize(ctx, in)
			}), middleware.After)
	}
}
