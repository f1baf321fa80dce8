package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	demov1 "github.com/guilhem/operator-plugin-framework/examples/gen/demo/v1"
	"github.com/guilhem/operator-plugin-framework/examples/validator"
)

// A step makes calls through the tunnel, prints them, and fails when what
// comes back is not what a direct gRPC connection would give.
type step func(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error

var steps = []struct {
	name string
	run  step
}{
	{"unary call", unary},
	{"server-streaming call", serverStreaming},
	{"client-streaming call", clientStreaming},
	{"bidirectional-streaming call", bidiStreaming},
	{"error with details", errorDetails},
	{"deadline", deadline},
}

// The resources the steps send.
var (
	web = &demov1.Resource{Kind: "Deployment", Namespace: "shop", Name: "web",
		Labels: map[string]string{"app": "web", "team": "payments"}}
	debug = &demov1.Resource{Kind: "Pod", Namespace: "default", Name: "debug"}
	cache = &demov1.Resource{Kind: "StatefulSet", Namespace: "shop", Name: "Cache",
		Labels: map[string]string{"team": "payments"}}
	nameless = &demov1.Resource{Kind: "Deployment", Namespace: "shop"}
)

func unary(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	const timeout = 2 * time.Second
	section(w, "unary: Validate, with a %s deadline and request metadata", timeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, validator.RequestIDKey, "demo-1")
	sent(w, "%s, metadata %s=demo-1", describe(web), validator.RequestIDKey)

	var header, trailer metadata.MD
	resp, err := c.Validate(ctx, &demov1.ValidateRequest{Resource: web}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		return err
	}
	got(w, "%s", verdict(resp.GetVerdict()))
	got(w, "headers:  %s", formatMD(header))
	got(w, "trailers: %s", formatMD(trailer))

	if !resp.GetVerdict().GetAllowed() {
		return errors.New("want the resource allowed")
	}
	if id := header.Get(validator.RequestIDKey); !slices.Equal(id, []string{"demo-1"}) {
		return fmt.Errorf("request id header %q, want demo-1", id)
	}
	left, err := time.ParseDuration(first(header.Get(validator.DeadlineLeftKey)))
	if err != nil || left <= 0 || left > timeout {
		return fmt.Errorf("the plugin saw %q left before the deadline, want (0, %s]", header.Get(validator.DeadlineLeftKey), timeout)
	}
	if n := trailer.Get(validator.RulesEvaluatedKey); !slices.Equal(n, []string{"3"}) {
		return fmt.Errorf("rules evaluated trailer %q, want 3", n)
	}
	return nil
}

func serverStreaming(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	section(w, "server streaming: ListRules")
	sent(w, "ListRulesRequest{}")
	stream, err := c.ListRules(ctx, &demov1.ListRulesRequest{})
	if err != nil {
		return err
	}
	n := 0
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		n++
		got(w, "rule %s: %s", resp.GetRule().GetName(), resp.GetRule().GetDescription())
	}
	got(w, "end of stream, status OK")
	if n != 3 {
		return fmt.Errorf("got %d rules, want 3", n)
	}
	return nil
}

func clientStreaming(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	section(w, "client streaming: ValidateBatch")
	stream, err := c.ValidateBatch(ctx)
	if err != nil {
		return err
	}
	for _, r := range []*demov1.Resource{web, debug, cache} {
		sent(w, "%s", describe(r))
		if err := stream.Send(&demov1.ValidateBatchRequest{Resource: r}); err != nil {
			return fmt.Errorf("send: %w", err)
		}
	}
	sent(w, "end of stream")
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	got(w, "checked %d, denied %d:", resp.GetChecked(), len(resp.GetDenied()))
	for _, v := range resp.GetDenied() {
		got(w, "  %s", verdict(v))
	}
	if resp.GetChecked() != 3 || len(resp.GetDenied()) != 2 {
		return errors.New("want 3 checked, 2 denied")
	}
	return nil
}

func bidiStreaming(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	section(w, "bidirectional streaming: Review, an answer to each resource as it arrives")
	stream, err := c.Review(ctx)
	if err != nil {
		return err
	}
	for _, r := range []*demov1.Resource{debug, web} {
		sent(w, "%s", describe(r))
		if err := stream.Send(&demov1.ReviewRequest{Resource: r}); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		got(w, "%s", verdict(resp.GetVerdict()))
		if want := r.GetNamespace() + "/" + r.GetName(); resp.GetVerdict().GetResource() != want {
			return fmt.Errorf("verdict on %q, want %q", resp.GetVerdict().GetResource(), want)
		}
	}
	sent(w, "end of stream")
	if err := stream.CloseSend(); err != nil {
		return err
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("got %v, want the end of the stream", err)
	}
	got(w, "end of stream, status OK")
	return nil
}

func errorDetails(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	section(w, "error status with details: Validate, on a resource without a name")
	sent(w, "%s", describe(nameless))
	_, err := c.Validate(ctx, &demov1.ValidateRequest{Resource: nameless})
	st := status.Convert(err)
	got(w, "status %s: %s", st.Code(), st.Message())
	var field string
	for _, d := range st.Details() {
		m, ok := d.(proto.Message)
		if !ok {
			return fmt.Errorf("undecodable detail: %v", d)
		}
		got(w, "detail %s", proto.MessageName(m))
		if br, ok := m.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				got(w, "  field %s: %s", v.GetField(), v.GetDescription())
				field = v.GetField()
			}
		}
	}
	if st.Code() != codes.InvalidArgument || field != "resource.name" {
		return fmt.Errorf("got %v with details %v, want InvalidArgument with a BadRequest on resource.name", err, st.Details())
	}
	return nil
}

func deadline(ctx context.Context, w io.Writer, c demov1.ValidatorServiceClient) error {
	const timeout = 200 * time.Millisecond
	section(w, "deadline: Review with a %s deadline, sending nothing", timeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	stream, err := c.Review(ctx)
	if err != nil {
		return err
	}
	_, err = stream.Recv()
	got(w, "status %s after %s", status.Code(err), time.Since(start).Round(10*time.Millisecond))
	if status.Code(err) != codes.DeadlineExceeded {
		return fmt.Errorf("got %v, want DeadlineExceeded", err)
	}
	return nil
}

func section(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "\n== %s\n", fmt.Sprintf(format, args...))
}

func sent(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "   -> %s\n", fmt.Sprintf(format, args...))
}

func got(w io.Writer, format string, args ...any) {
	fmt.Fprintf(w, "   <- %s\n", fmt.Sprintf(format, args...))
}

// describe prints a resource as "Kind namespace/name {k=v, ...}".
func describe(r *demov1.Resource) string {
	name := r.GetName()
	if name == "" {
		name = "(no name)"
	}
	s := fmt.Sprintf("%s %s/%s", r.GetKind(), r.GetNamespace(), name)
	if len(r.GetLabels()) > 0 {
		var kv []string
		for k, v := range r.GetLabels() {
			kv = append(kv, k+"="+v)
		}
		slices.Sort(kv)
		s += " {" + strings.Join(kv, ", ") + "}"
	}
	return s
}

func verdict(v *demov1.Verdict) string {
	if v.GetAllowed() {
		return v.GetResource() + ": allowed"
	}
	var why []string
	for _, x := range v.GetViolations() {
		why = append(why, x.GetRule()+" ("+x.GetMessage()+")")
	}
	return v.GetResource() + ": denied, " + strings.Join(why, ", ")
}

// formatMD prints metadata as sorted "key=value" pairs.
func formatMD(md metadata.MD) string {
	var kv []string
	for k, vs := range md {
		for _, v := range vs {
			kv = append(kv, k+"="+v)
		}
	}
	slices.Sort(kv)
	return strings.Join(kv, " ")
}

func first(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}
