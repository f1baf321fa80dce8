package registry_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
)

// calls returns plugin_framework_calls_total for plugin and method, by
// code, and the number of call_duration_seconds observations.
func calls(t *testing.T, plugin, method string) (byCode map[string]float64, durations uint64) {
	t.Helper()
	mfs, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	byCode = map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["plugin"] != plugin || labels["method"] != method {
				continue
			}
			switch mf.GetName() {
			case "plugin_framework_calls_total":
				byCode[labels["code"]] += m.GetCounter().GetValue()
			case "plugin_framework_call_duration_seconds":
				durations += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return byCode, durations
}

// instances returns plugin_framework_instances for plugin, and whether the
// series exists.
func instances(t *testing.T, plugin string) (float64, bool) {
	t.Helper()
	mfs, err := metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "plugin_framework_instances" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "plugin" && l.GetValue() == plugin {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

const svcPrefix = "/grpc.testing.TestService/"

// TestMetricsCountEveryCallOnce makes calls of every RPC kind that end in
// every way a caller can end them, and checks that each is counted once,
// with its code.
func TestMetricsCountEveryCallOnce(t *testing.T) {
	notFound := &testgrpc.EchoStatus{Code: int32(codes.NotFound)}
	cases := []struct {
		name, method, code string
		call               func(ctx context.Context, c testgrpc.TestServiceClient) error
	}{
		{"unary ok", "UnaryCall", "OK", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{})
			return err
		}},
		{"unary status", "UnaryCall", "NotFound", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseStatus: notFound})
			return ignore(err, codes.NotFound)
		}},
		{"server streaming ok", "StreamingOutputCall", "OK", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			s, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: testservice.Sizes(1, 2)})
			if err != nil {
				return err
			}
			return drain(s.Recv)
		}},
		{"server streaming status", "StreamingOutputCall", "NotFound", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			s, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseStatus: notFound})
			if err != nil {
				return err
			}
			return ignore(drain(s.Recv), codes.NotFound)
		}},
		{"server streaming not read to the end", "StreamingOutputCall", "Canceled", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel() // the usual way to drop a stream
			s, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: testservice.Sizes(1, 2, 3)})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}},
		{"client streaming ok", "StreamingInputCall", "OK", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			s, err := c.StreamingInputCall(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&testgrpc.StreamingInputCallRequest{Payload: testservice.Payload(3)}); err != nil {
				return err
			}
			_, err = s.CloseAndRecv()
			return err
		}},
		{"client streaming cancelled", "StreamingInputCall", "Canceled", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := c.StreamingInputCall(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&testgrpc.StreamingInputCallRequest{}); err != nil {
				return err
			}
			cancel()
			_, err = s.CloseAndRecv()
			return ignore(err, codes.Canceled)
		}},
		{"bidi ok", "FullDuplexCall", "OK", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			s, err := c.FullDuplexCall(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: testservice.Sizes(4)}); err != nil {
				return err
			}
			if _, err := s.Recv(); err != nil {
				return err
			}
			if err := s.CloseSend(); err != nil {
				return err
			}
			return drain(s.Recv)
		}},
		{"bidi status", "FullDuplexCall", "NotFound", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			s, err := c.FullDuplexCall(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{ResponseStatus: notFound}); err != nil {
				return err
			}
			return ignore(drain(s.Recv), codes.NotFound)
		}},
		{"bidi dropped mid-stream", "FullDuplexCall", "Canceled", func(ctx context.Context, c testgrpc.TestServiceClient) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := c.FullDuplexCall(ctx)
			if err != nil {
				return err
			}
			if err := s.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: testservice.Sizes(1)}); err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}},
	}
	op := plugintest.New(t)
	op.StartPlugin("metered", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	c := testgrpc.NewTestServiceClient(op.Registry().Plugin("metered"))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before, durBefore := calls(t, "metered", svcPrefix+tc.method)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := tc.call(ctx, c); err != nil {
				t.Fatal(err)
			}
			// A stream dropped by its context is counted by a callback: let
			// it run, and anything counted twice show.
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if now, _ := calls(t, "metered", svcPrefix+tc.method); now[tc.code] > before[tc.code] {
					break
				}
			}
			time.Sleep(50 * time.Millisecond)
			after, dur := calls(t, "metered", svcPrefix+tc.method)
			for code, n := range after {
				want := before[code]
				if code == tc.code {
					want++
				}
				if n != want {
					t.Errorf("calls_total{code=%s} went from %v to %v, want %v", code, before[code], n, want)
				}
			}
			if after[tc.code] == 0 {
				t.Errorf("no call counted with code %s: %v", tc.code, after)
			}
			if dur != durBefore+1 {
				t.Errorf("call_duration_seconds observed %d times, want once", dur-durBefore)
			}
		})
	}
}

func TestMetricsCallWithoutInstance(t *testing.T) {
	op := plugintest.New(t)
	before, _ := calls(t, "absent", svcPrefix+"EmptyCall")
	_, err := testgrpc.NewTestServiceClient(op.Registry().Plugin("absent")).EmptyCall(context.Background(), &testgrpc.Empty{})
	if status.Code(err) != codes.Unavailable {
		t.Fatal(err)
	}
	after, _ := calls(t, "absent", svcPrefix+"EmptyCall")
	if after["Unavailable"] != before["Unavailable"]+1 {
		t.Fatalf("calls_total %v, before %v", after, before)
	}
}

func TestMetricsInstancesSeriesDeleted(t *testing.T) {
	op := plugintest.New(t)
	a := op.StartPlugin("gauged", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	b := op.StartPlugin("gauged", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	if n, _ := instances(t, "gauged"); n != 2 {
		t.Fatalf("instances = %v, want 2", n)
	}
	a.Stop()
	if n, _ := instances(t, "gauged"); n != 1 {
		t.Fatalf("instances = %v, want 1", n)
	}
	b.Kill()
	if n, ok := instances(t, "gauged"); ok {
		t.Fatalf("instances = %v after the last instance left; want no series", n)
	}
}

// drain reads a stream to its end.
func drain[T any](recv func() (T, error)) error {
	for {
		if _, err := recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// ignore returns nil if err has the expected code.
func ignore(err error, code codes.Code) error {
	if status.Code(err) == code {
		return nil
	}
	if err == nil {
		return status.Errorf(codes.Internal, "no error, want %s", code)
	}
	return err
}
