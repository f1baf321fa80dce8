package registry_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/retry"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
	"github.com/guilhem/operator-plugin-framework/go/registry"
)

// otelgrpc's stats handler, as on a *grpc.ClientConn: one client span per
// call, named after the method, ended with the call's status.
func TestOtelgrpcStatsHandler(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer tp.Shutdown(context.Background())
	op := plugintest.New(t, plugintest.WithRegistryOptions(
		registry.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp)))))
	op.StartPlugin("traced", &testgrpc.TestService_ServiceDesc, &testservice.Service{})
	c := testgrpc.NewTestServiceClient(op.Registry().Plugin("traced"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.NotFound), Message: "nope"}}); status.Code(err) != codes.NotFound {
		t.Fatal(err)
	}
	s, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: testservice.Sizes(1, 2)})
	if err != nil {
		t.Fatal(err)
	}
	if err := drain(s.Recv); err != nil {
		t.Fatal(err)
	}

	want := map[string]string{
		"grpc.testing.TestService/UnaryCall":           "NOT_FOUND",
		"grpc.testing.TestService/StreamingOutputCall": "OK",
	}
	for _, span := range rec.Ended() {
		code, ok := want[span.Name()]
		if !ok {
			continue // the engine's own span, inside otelgrpc's
		}
		for _, kv := range span.Attributes() {
			if kv.Key == "rpc.response.status_code" && kv.Value.AsString() == code {
				delete(want, span.Name())
			}
		}
	}
	if len(want) > 0 {
		var names []string
		for _, s := range rec.Ended() {
			names = append(names, s.Name())
		}
		t.Fatalf("no ended otelgrpc span for %v; ended spans: %v", want, names)
	}
}

// go-grpc-middleware's retry interceptor retries a call that the plugin
// failed with UNAVAILABLE; each attempt is a call for the metrics.
func TestRetryInterceptor(t *testing.T) {
	var attempts atomic.Int64
	svc := &testservice.Service{OnEmpty: func(context.Context) error {
		if attempts.Add(1) == 1 {
			return status.Error(codes.Unavailable, "warming up")
		}
		return nil
	}}
	op := plugintest.New(t, plugintest.WithRegistryOptions(registry.WithUnaryInterceptor(
		retry.UnaryClientInterceptor(retry.WithCodes(codes.Unavailable), retry.WithMax(3),
			retry.WithBackoff(retry.BackoffLinear(10*time.Millisecond))))))
	op.StartPlugin("retried", &testgrpc.TestService_ServiceDesc, svc)
	before, _ := calls(t, "retried", svcPrefix+"EmptyCall")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := testgrpc.NewTestServiceClient(op.Registry().Plugin("retried")).EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	if attempts.Load() != 2 {
		t.Fatalf("the plugin saw %d attempts, want 2", attempts.Load())
	}
	after, _ := calls(t, "retried", svcPrefix+"EmptyCall")
	if after["Unavailable"] != before["Unavailable"]+1 || after["OK"] != before["OK"]+1 {
		t.Fatalf("calls_total %v (before %v), want one more Unavailable and one more OK", after, before)
	}
}

// A reconcile context has no deadline: WithDefaultTimeout gives one, which
// the plugin's handler sees.
func TestDefaultTimeoutReachesThePlugin(t *testing.T) {
	var deadline atomic.Bool
	svc := &testservice.Service{Observe: func(ctx context.Context) {
		_, ok := ctx.Deadline()
		deadline.Store(ok)
	}}
	op := plugintest.New(t, plugintest.WithRegistryOptions(registry.WithDefaultTimeout(200*time.Millisecond)))
	p := op.StartPlugin("bounded", &testgrpc.TestService_ServiceDesc, svc)
	c := testgrpc.NewTestServiceClient(op.Registry().Plugin("bounded"))
	if _, err := c.EmptyCall(context.Background(), &testgrpc.Empty{}); err != nil {
		t.Fatal(err)
	}
	if !deadline.Load() {
		t.Fatal("the handler saw no deadline")
	}
	p.Delay(time.Hour)
	start := time.Now()
	if _, err := c.EmptyCall(context.Background(), &testgrpc.Empty{}); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a slow plugin: %v, want DEADLINE_EXCEEDED", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the default timeout of 200ms ended the call after %v", d)
	}
	// Streams get it too.
	s, err := c.StreamingOutputCall(context.Background(), &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a slow stream: %v, want DEADLINE_EXCEEDED", err)
	}
}
