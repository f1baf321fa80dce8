package registry_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/guilhem/operator-plugin-framework/go/internal/testservice"
	"github.com/guilhem/operator-plugin-framework/go/plugintest"
)

// reconnect is the service that only the new version serves.
type reconnect struct {
	testgrpc.UnimplementedReconnectServiceServer
	calls atomic.Int64
}

func (r *reconnect) Start(context.Context, *testgrpc.ReconnectParams) (*testgrpc.Empty, error) {
	r.calls.Add(1)
	return &testgrpc.Empty{}, nil
}

// TestRollingUpgradeUnderLoad replaces two instances of v1 (TestService)
// by two of v2 (TestService and ReconnectService) while callers keep
// calling both services: no call fails, and calls for ReconnectService
// reach only v2 instances.
func TestRollingUpgradeUnderLoad(t *testing.T) {
	op := plugintest.New(t)
	start := func(version string, extra *reconnect) *plugintest.Plugin {
		opts := []plugintest.PluginOption{plugintest.Version(version)}
		if extra != nil {
			opts = append(opts, plugintest.Service(&testgrpc.ReconnectService_ServiceDesc, extra))
		}
		return op.StartPlugin("p", &testgrpc.TestService_ServiceDesc, &testservice.Service{}, opts...)
	}
	v1a, v1b := start("v1", nil), start("v1", nil)
	p := op.Registry().Plugin("p")
	test, recon := testgrpc.NewTestServiceClient(p), testgrpc.NewReconnectServiceClient(p)

	_, err := recon.Start(context.Background(), &testgrpc.ReconnectParams{})
	if st := status.Convert(err); st.Code() != codes.Unimplemented || st.Message() != `plugin "p" has no instance serving grpc.testing.ReconnectService` {
		t.Fatalf("before the upgrade: %v", err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	for i := range 8 {
		wg.Go(func() {
			for n := 0; n < 5000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				var err error
				if (i+n)%2 == 0 {
					_, err = test.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseSize: 16})
				} else {
					// Waits until a v2 instance serves it.
					_, err = recon.Start(ctx, &testgrpc.ReconnectParams{}, grpc.WaitForReady(true))
				}
				cancel()
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				} else {
					ok.Add(1)
				}
			}
		})
	}
	pause := func() { time.Sleep(150 * time.Millisecond) }
	pause()
	ra, rb := &reconnect{}, &reconnect{}
	v2a := start("v2", ra)
	pause()
	v1a.Stop() // drains: its calls in flight finish
	pause()
	v2b := start("v2", rb)
	pause()
	v1b.Stop()
	pause()
	close(stop)
	wg.Wait()

	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d calls failed during the rollout, the first with %v", n, n+ok.Load(), firstErr.Load())
	}
	if ok.Load() < 100 {
		t.Fatalf("only %d calls in the rollout", ok.Load())
	}
	if ra.calls.Load() == 0 || rb.calls.Load() == 0 {
		t.Fatalf("ReconnectService calls: v2a %d, v2b %d; want both", ra.calls.Load(), rb.calls.Load())
	}
	for name, pl := range map[string]*plugintest.Plugin{"v1a": v1a, "v1b": v1b, "v2a": v2a, "v2b": v2b} {
		if pl.Calls() == 0 {
			t.Errorf("%s took no call", name)
		}
	}
	t.Logf("%d calls; ReconnectService on v2a %d, v2b %d", ok.Load(), ra.calls.Load(), rb.calls.Load())
}
