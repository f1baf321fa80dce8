package integration_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/grpclog"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

// grpc-go's interop test cases (google.golang.org/grpc/interop) run against
// its interop TestService served by a plugin, called through the registry,
// with the same cases against a direct gRPC server as the control. The
// interop functions report a failure with grpclog's Fatal, which exits the
// process; failLogger turns it into a panic that the test catches.

// failLogger is a grpclog.LoggerV2 that panics on Fatal and drops the rest.
type failLogger struct{ grpclog.LoggerV2 }

type interopFailure struct{ msg string }

func (failLogger) Fatal(args ...any)   { panic(interopFailure{fmt.Sprint(args...)}) }
func (failLogger) Fatalln(args ...any) { panic(interopFailure{fmt.Sprint(args...)}) }
func (failLogger) Fatalf(format string, args ...any) {
	panic(interopFailure{fmt.Sprintf(format, args...)})
}
func (failLogger) FatalDepth(_ int, args ...any) { panic(interopFailure{fmt.Sprint(args...)}) }
func (failLogger) InfoDepth(int, ...any)         {}
func (failLogger) WarningDepth(int, ...any)      {}
func (failLogger) ErrorDepth(int, ...any)        {}

func init() {
	grpclog.SetLoggerV2(failLogger{grpclog.NewLoggerV2(discard{}, discard{}, discard{})})
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// interopCase is one of grpc-go's client cases.
type interopCase struct {
	name string
	run  func(ctx context.Context, cc grpc.ClientConnInterface)
}

var interopCases = []interopCase{
	{"empty_unary", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoEmptyUnaryCall(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"large_unary", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoLargeUnaryCall(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"client_streaming", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoClientStreaming(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"server_streaming", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoServerStreaming(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"ping_pong", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoPingPong(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"empty_stream", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoEmptyStream(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"timeout_on_sleeping_server", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoTimeoutOnSleepingServer(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"cancel_after_begin", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoCancelAfterBegin(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"cancel_after_first_response", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoCancelAfterFirstResponse(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"custom_metadata", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoCustomMetadata(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"status_code_and_message", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoStatusCodeAndMessage(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"special_status_message", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoSpecialStatusMessage(ctx, testgrpc.NewTestServiceClient(cc))
	}},
	{"unimplemented_service", func(ctx context.Context, cc grpc.ClientConnInterface) {
		interop.DoUnimplementedService(ctx, testgrpc.NewUnimplementedServiceClient(cc))
	}},
	{"unimplemented_method", func(ctx context.Context, cc grpc.ClientConnInterface) {
		// interop.DoUnimplementedMethod takes a *grpc.ClientConn; the same
		// call on any ClientConnInterface.
		err := cc.Invoke(ctx, "/grpc.testing.TestService/UnimplementedCall", &testgrpc.Empty{}, &testgrpc.Empty{})
		if status.Code(err) != codes.Unimplemented {
			panic(interopFailure{fmt.Sprintf("UnimplementedCall: %v, want UNIMPLEMENTED", err)})
		}
	}},
}

// runInterop runs c and returns its failure, if any.
func runInterop(c interopCase, cc grpc.ClientConnInterface) (failure string) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(interopFailure)
			if !ok {
				panic(r)
			}
			failure = f.msg
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c.run(ctx, cc)
	return ""
}

// interopConns are the tunnel and the direct control.
func interopConns(t *testing.T) map[string]grpc.ClientConnInterface {
	o := startOperator(t)
	o.plugin(t, "interop", interop.NewTestServer())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := o.reg.Wait(ctx, "interop")
	if err != nil {
		t.Fatal(err)
	}

	cc := directServer(t, interop.NewTestServer())
	return map[string]grpc.ClientConnInterface{"tunnel": p, "direct": cc}
}

func TestInterop(t *testing.T) {
	for name, cc := range interopConns(t) {
		for _, c := range interopCases {
			t.Run(name+"/"+c.name, func(t *testing.T) {
				if f := runInterop(c, cc); f != "" {
					t.Fatal(f)
				}
			})
		}
	}
}

// TestInteropConcurrent: 16 goroutines run every case (ping-pong included)
// through the tunnel at once, several times over.
func TestInteropConcurrent(t *testing.T) {
	conns := interopConns(t)
	for _, name := range []string{"tunnel", "direct"} {
		cc := conns[name]
		var wg sync.WaitGroup
		var mu sync.Mutex
		calls, failures := 0, []string{}
		for g := range 16 {
			wg.Go(func() {
				for round := range 4 {
					for i := range interopCases {
						c := interopCases[(i+g+round)%len(interopCases)]
						f := runInterop(c, cc)
						mu.Lock()
						calls++
						if f != "" {
							failures = append(failures, c.name+": "+f)
						}
						mu.Unlock()
					}
				}
			})
		}
		wg.Wait()
		t.Logf("%s: %d interop cases run concurrently by 16 goroutines, %d failed", name, calls, len(failures))
		for i, f := range failures {
			if i == 5 {
				break
			}
			t.Errorf("%s: %s", name, f)
		}
	}
}
