package e2e

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/guilhem/operator-plugin-framework/go/client"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// TestLeaderHandOver: two replicas of an operator, each a controller-runtime
// manager with leader election on one Lease of a real API server, each
// serving plugins; one plugin given the replicas' shared name. Whichever
// replica leads calls the plugin from its first moment as leader: the
// plugin holds a tunnel to every replica (docs/tunnel-spec.md 14.3), so a
// hand-over needs no reconnection.
func TestLeaderHandOver(t *testing.T) {
	dir, _ := assets(t)
	env := &envtest.Environment{BinaryAssetsDirectory: dir}
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
	})

	port := freePort(t)
	ips := []string{"127.0.0.2", "127.0.0.3"}
	var replicas []*leaderReplica
	for _, ip := range ips {
		replicas = append(replicas, startLeaderReplica(t, cfg, net.JoinHostPort(ip, fmt.Sprint(port)), ip))
	}
	lookup := func(_ context.Context, host string) ([]string, error) {
		if host != "operator.e2e" {
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		return slices.Clone(ips), nil
	}
	c, err := client.New(t.Context(), "echo", fmt.Sprintf("dns:///operator.e2e:%d", port), "v1",
		&testgrpc.TestService_ServiceDesc, &echoService{}, client.WithLookupHost(lookup))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// The first leader may have taken the lease before the plugin came;
	// what matters is the hand-over, once the plugin holds both tunnels.
	first := waitLeading(t, replicas, nil, 30*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for len(c.Registrations()) < len(ips) {
		if time.Now().After(deadline) {
			t.Fatalf("the plugin holds %v, want a tunnel to each of %v", c.Registrations(), ips)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("leader %s; the plugin is registered with %d replicas", first.name, len(c.Registrations()))

	// The leader steps down (a rollout: its manager stops and releases the
	// lease); the other takes over and calls at once.
	start := time.Now()
	first.stop()
	second := waitLeading(t, replicas, first, 30*time.Second)
	if second.firstCall.Err != nil {
		t.Fatalf("new leader %s: first call: %v", second.name, second.firstCall.Err)
	}
	t.Logf("hand-over: %s leads %v after %s stepped down, and called the plugin %v after taking the lease (first attempt)",
		second.name, second.leadAt.Sub(start).Round(time.Millisecond), first.name, second.firstCall.After.Round(time.Microsecond))
}

// leaderReplica is one operator replica: a manager with leader election,
// the plugin server, and a leader-only runnable that calls the plugin once
// it leads.
type leaderReplica struct {
	name     string
	cancel   context.CancelFunc
	done     chan error
	stopOnce sync.Once

	mu        sync.Mutex
	leading   bool
	leadAt    time.Time
	firstCall callResult
}

type callResult struct {
	After time.Duration // from taking the lease to the call's answer
	Err   error
}

func startLeaderReplica(t *testing.T, cfg *rest.Config, addr, name string) *leaderReplica {
	t.Helper()
	srv, err := server.New(addr, server.WithReplica(name, 2), server.WithInsecureNoAuthentication()) // loopback, no credentials in this test
	if err != nil {
		t.Fatal(err)
	}
	mgr, err := manager.New(cfg, manager.Options{
		LeaderElection:                true,
		LeaderElectionID:              "opf-e2e-leader",
		LeaderElectionNamespace:       "default",
		LeaderElectionReleaseOnCancel: true,
		LeaseDuration:                 durationPtr(3 * time.Second),
		RenewDeadline:                 durationPtr(2 * time.Second),
		RetryPeriod:                   durationPtr(200 * time.Millisecond),
		Metrics:                       metricsserver.Options{BindAddress: "0"},
	})
	if err != nil {
		t.Fatal(err)
	}
	r := &leaderReplica{name: name, done: make(chan error, 1)}
	if err := mgr.Add(srv); err != nil { // every replica serves plugins
		t.Fatal(err)
	}
	// A RunnableFunc is leader-only, as reconcilers are.
	err = mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		at := time.Now()
		res := callResult{}
		p, err := srv.GetRegistry().Get("echo") // no waiting: the plugin must already be there
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err = testgrpc.NewTestServiceClient(p).EmptyCall(cctx, &testgrpc.Empty{})
			cancel()
		}
		res.After, res.Err = time.Since(at), err
		r.mu.Lock()
		r.leading, r.leadAt, r.firstCall = true, at, res
		r.mu.Unlock()
		<-ctx.Done()
		return nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- mgr.Start(ctx) }()
	t.Cleanup(r.stop)
	return r
}

// stop stops the replica's manager, which releases the lease if it held it.
func (r *leaderReplica) stop() {
	r.stopOnce.Do(func() {
		r.cancel()
		if err := <-r.done; err != nil {
			fmt.Println("manager", r.name, "stopped:", err)
		}
	})
}

// waitLeading waits for a replica other than not to lead and to have made
// its first call.
func waitLeading(t *testing.T, replicas []*leaderReplica, not *leaderReplica, within time.Duration) *leaderReplica {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		for _, r := range replicas {
			if r == not {
				continue
			}
			r.mu.Lock()
			leading := r.leading
			r.mu.Unlock()
			if leading {
				return r
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no replica led within %v", within)
	return nil
}

func durationPtr(d time.Duration) *time.Duration { return &d }

func freePort(t *testing.T) int {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().(*net.TCPAddr).Port
}

type echoService struct {
	testgrpc.UnimplementedTestServiceServer
}

func (echoService) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	return &testgrpc.Empty{}, nil
}
