// Package validator is the plugin side of the examples: an implementation
// of demo.v1.ValidatorService, written as for any gRPC server. Nothing in
// it knows about the tunnel; the plugin programs serve it with client.New.
package validator

import (
	"context"
	"io"
	"regexp"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
)

// Metadata that Validate sends back, to show what crosses the tunnel.
const (
	// RequestIDKey is echoed from the request metadata into the response
	// headers.
	RequestIDKey = "x-request-id"
	// DeadlineLeftKey is a response header holding the time that was left
	// before the call's deadline when the handler started ("none" without
	// a deadline).
	DeadlineLeftKey = "x-deadline-left"
	// RulesEvaluatedKey is a trailer holding how many rules were checked.
	RulesEvaluatedKey = "x-rules-evaluated"
)

// Server implements demo.v1.ValidatorService. The zero value is ready to
// use.
type Server struct {
	demov1.UnimplementedValidatorServiceServer
}

var _ demov1.ValidatorServiceServer = (*Server)(nil)

// Validate checks one resource. A resource without a name is refused with
// INVALID_ARGUMENT and a google.rpc.BadRequest detail.
func (s *Server) Validate(ctx context.Context, req *demov1.ValidateRequest) (*demov1.ValidateResponse, error) {
	left := "none"
	if d, ok := ctx.Deadline(); ok {
		left = time.Until(d).Truncate(time.Millisecond).String()
	}
	header := metadata.Pairs(DeadlineLeftKey, left)
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		for _, id := range md.Get(RequestIDKey) {
			header.Append(RequestIDKey, id)
		}
	}
	if err := grpc.SetHeader(ctx, header); err != nil {
		return nil, err
	}
	if err := checkResource(req.GetResource()); err != nil {
		return nil, err
	}
	if err := grpc.SetTrailer(ctx, metadata.Pairs(RulesEvaluatedKey, strconv.Itoa(len(rules)))); err != nil {
		return nil, err
	}
	return &demov1.ValidateResponse{Verdict: Check(req.GetResource())}, nil
}

// ListRules sends the rules, one per message.
func (s *Server) ListRules(_ *demov1.ListRulesRequest, stream grpc.ServerStreamingServer[demov1.ListRulesResponse]) error {
	for _, r := range Rules() {
		if err := stream.Send(&demov1.ListRulesResponse{Rule: r}); err != nil {
			return err
		}
	}
	return nil
}

// ValidateBatch checks every resource received and answers with the
// denied ones once the caller closes its side.
func (s *Server) ValidateBatch(stream grpc.ClientStreamingServer[demov1.ValidateBatchRequest, demov1.ValidateBatchResponse]) error {
	resp := &demov1.ValidateBatchResponse{}
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(resp)
		}
		if err != nil {
			return err
		}
		if err := checkResource(req.GetResource()); err != nil {
			return err
		}
		resp.Checked++
		if v := Check(req.GetResource()); !v.GetAllowed() {
			resp.Denied = append(resp.Denied, v)
		}
	}
}

// Review answers each resource as it arrives, until the caller closes its
// side.
func (s *Server) Review(stream grpc.BidiStreamingServer[demov1.ReviewRequest, demov1.ReviewResponse]) error {
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := checkResource(req.GetResource()); err != nil {
			return err
		}
		if err := stream.Send(&demov1.ReviewResponse{Verdict: Check(req.GetResource())}); err != nil {
			return err
		}
	}
}

// rule is one check: it returns a message when r breaks the rule.
type rule struct {
	name, description string
	check             func(r *demov1.Resource) (violation string)
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

var rules = []rule{
	{
		name:        "team-label",
		description: `every resource has a "team" label`,
		check: func(r *demov1.Resource) string {
			if r.GetLabels()["team"] == "" {
				return `no "team" label`
			}
			return ""
		},
	},
	{
		name:        "no-default-namespace",
		description: "nothing lives in the default namespace",
		check: func(r *demov1.Resource) string {
			if ns := r.GetNamespace(); ns == "" || ns == "default" {
				return "in the default namespace"
			}
			return ""
		},
	},
	{
		name:        "dns-label-name",
		description: "names are DNS labels: at most 63 lower-case letters, digits and '-'",
		check: func(r *demov1.Resource) string {
			if n := r.GetName(); len(n) > 63 || !dnsLabel.MatchString(n) {
				return "name " + strconv.Quote(n) + " is not a DNS label"
			}
			return ""
		},
	},
}

// Rules lists the rules Check applies, in order.
func Rules() []*demov1.Rule {
	out := make([]*demov1.Rule, len(rules))
	for i, r := range rules {
		out[i] = &demov1.Rule{Name: r.name, Description: r.description}
	}
	return out
}

// Check applies every rule to r.
func Check(r *demov1.Resource) *demov1.Verdict {
	v := &demov1.Verdict{Resource: r.GetNamespace() + "/" + r.GetName(), Allowed: true}
	for _, rl := range rules {
		if msg := rl.check(r); msg != "" {
			v.Allowed = false
			v.Violations = append(v.Violations, &demov1.Violation{Rule: rl.name, Message: msg})
		}
	}
	return v
}

// checkResource refuses a request that cannot be validated at all, with
// the offending field in a BadRequest detail.
func checkResource(r *demov1.Resource) error {
	switch {
	case r == nil:
		return badRequest("resource", "is required")
	case r.GetName() == "":
		return badRequest("resource.name", "is required")
	}
	return nil
}

func badRequest(field, problem string) error {
	st := status.New(codes.InvalidArgument, field+" "+problem)
	detailed, err := st.WithDetails(&errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: field, Description: problem}},
	})
	if err != nil {
		return st.Err()
	}
	return detailed.Err()
}
