// Package testservice is gRPC's interop TestService as the framework's
// tests and benchmarks serve it: requests say what to answer (payload
// sizes, a status), and hooks let a test observe or stall a handler.
package testservice

import (
	"context"
	"errors"
	"io"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Service implements grpc.testing.TestService:
//   - payloads have the sizes the request asks for, filled by Payload;
//   - a request's ResponseStatus becomes the call's status, with an
//     errdetails.ErrorInfo{Reason: "TEST"} detail;
//   - request metadata keys starting with "x-echo" come back as headers,
//     those starting with "x-trail" as trailers.
type Service struct {
	testgrpc.UnimplementedTestServiceServer
	// Observe, when set, sees the context of every call.
	Observe func(ctx context.Context)
	// OnEmpty, when set, runs in EmptyCall; its error fails the call.
	OnEmpty func(ctx context.Context) error
}

// Payload returns n bytes of the pattern i % 256.
func Payload(n int32) *testgrpc.Payload {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return &testgrpc.Payload{Body: b}
}

// Sizes asks for one response message per size.
func Sizes(n ...int32) []*testgrpc.ResponseParameters {
	out := make([]*testgrpc.ResponseParameters, len(n))
	for i, s := range n {
		out[i] = &testgrpc.ResponseParameters{Size: s}
	}
	return out
}

func (s *Service) begin(ctx context.Context) {
	if s.Observe != nil {
		s.Observe(ctx)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for k, vs := range md {
		switch {
		case strings.HasPrefix(k, "x-echo"):
			_ = grpc.SetHeader(ctx, metadata.MD{k: vs})
		case strings.HasPrefix(k, "x-trail"):
			_ = grpc.SetTrailer(ctx, metadata.MD{k: vs})
		}
	}
}

func statusErr(s *testgrpc.EchoStatus) error {
	if s.GetCode() == 0 {
		return nil
	}
	st := status.New(codes.Code(s.Code), s.Message)
	if withDetails, err := st.WithDetails(&errdetails.ErrorInfo{Reason: "TEST", Domain: "example.com", Metadata: map[string]string{"k": "v"}}); err == nil {
		st = withDetails
	}
	return st.Err()
}

func (s *Service) EmptyCall(ctx context.Context, _ *testgrpc.Empty) (*testgrpc.Empty, error) {
	s.begin(ctx)
	if s.OnEmpty != nil {
		if err := s.OnEmpty(ctx); err != nil {
			return nil, err
		}
	}
	return &testgrpc.Empty{}, nil
}

func (s *Service) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	s.begin(ctx)
	if err := statusErr(in.ResponseStatus); err != nil {
		return nil, err
	}
	return &testgrpc.SimpleResponse{Payload: Payload(in.ResponseSize)}, nil
}

func (s *Service) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	s.begin(stream.Context())
	for _, p := range in.ResponseParameters {
		time.Sleep(time.Duration(p.IntervalUs) * time.Microsecond)
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: Payload(p.Size)}); err != nil {
			return err
		}
	}
	return statusErr(in.ResponseStatus)
}

func (s *Service) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	s.begin(stream.Context())
	var total int32
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		total += int32(len(in.GetPayload().GetBody()))
	}
}

func (s *Service) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	s.begin(stream.Context())
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := statusErr(in.ResponseStatus); err != nil {
			return err
		}
		for _, p := range in.ResponseParameters {
			if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: Payload(p.Size)}); err != nil {
				return err
			}
		}
	}
}
