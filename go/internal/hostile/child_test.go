package hostile

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/guilhem/operator-plugin-framework/go/auth"
	"github.com/guilhem/operator-plugin-framework/go/server"
)

// childEnv holds the child's configuration, as JSON; its presence makes
// the test binary the child.
const childEnv = "HOSTILE_CHILD"

// childConfig is how the child runs the server.
type childConfig struct {
	// Mode is "anonymous" (no authenticator) or "builtin" (auth.BuiltIn
	// against the API server of Kubeconfig, for Audience).
	Mode       string `json:"mode"`
	Kubeconfig string `json:"kubeconfig,omitempty"`
	Audience   string `json:"audience,omitempty"`
	// ReviewDelay slows every TokenReview and SubjectAccessReview down, as
	// an overloaded API server would.
	ReviewDelay time.Duration `json:"reviewDelay,omitempty"`
	// Heartbeat is the server's heartbeat interval (0: its default).
	Heartbeat time.Duration `json:"heartbeat,omitempty"`
	// ConnIdle is the server's connection idle timeout (0: its default).
	ConnIdle time.Duration `json:"connIdle,omitempty"`
}

// childInfo is the first line the child prints.
type childInfo struct {
	Addr  string `json:"addr"`  // where plugins connect
	Stats string `json:"stats"` // base URL of the control endpoint
}

// stats is what the child's /stats reports.
type stats struct {
	Goroutines  int   `json:"goroutines"`
	TokenReview int64 `json:"tokenReviews"`
	AccessRev   int64 `json:"accessReviews"`
	// The server's own gauges.
	Connections  int `json:"connections"`
	Unregistered int `json:"unregistered"`
}

// gauge reads a gauge of controller-runtime's registry.
func gauge(name string) int {
	mfs, err := metrics.Registry.Gather()
	if err != nil {
		return -1
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return int(mf.GetMetric()[0].GetGauge().GetValue())
		}
	}
	return 0
}

// runChild serves plugins on loopback until stdin closes or a signal
// arrives, and answers on a control endpoint: /stats, /metrics (the
// controller-runtime registry), /call (a unary call to a plugin), /open
// (streaming calls to a plugin that are never read) and /delay (of the
// reviews).
func runChild(raw string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "child config:", err)
		return 2
	}
	// The server's log, at Info as an operator runs it, on stderr: the
	// parent measures it.
	log.SetLogger(funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{}))

	var tokenReviews, accessReviews atomic.Int64
	var delay atomic.Int64 // of each review, in nanoseconds
	delay.Store(int64(cfg.ReviewDelay))
	opts, err := childOptions(cfg, &tokenReviews, &accessReviews, &delay)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	srv, err := server.New("127.0.0.1:0", opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		// The parent holds our stdin: when it goes, so do we.
		var b [1]byte
		_, _ = os.Stdin.Read(b[:])
		stop()
	}()
	served := make(chan error, 1)
	go func() { served <- srv.Start(ctx) }()
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	addr, err := srv.Addr(actx)
	acancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}

	var (
		mu   sync.Mutex
		open []grpc.ClientStream // kept, never read
	)
	mux := http.NewServeMux()
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(stats{
			Goroutines: runtime.NumGoroutine(), TokenReview: tokenReviews.Load(), AccessRev: accessReviews.Load(),
			Connections:  gauge("plugin_framework_server_connections"),
			Unregistered: gauge("plugin_framework_server_unregistered_tunnels"),
		})
	})
	mux.HandleFunc("/delay", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		delay.Store(int64(d))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/call", func(w http.ResponseWriter, r *http.Request) {
		cctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		c := testgrpc.NewTestServiceClient(srv.GetRegistry().Plugin(r.URL.Query().Get("plugin")))
		if _, err := c.EmptyCall(cctx, &testgrpc.Empty{}, grpc.WaitForReady(true)); err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
		}
	})
	mux.HandleFunc("/open", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		cctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		p := srv.GetRegistry().Plugin(r.URL.Query().Get("plugin"))
		for range max(n, 1) {
			s, err := p.NewStream(context.Background(), &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/grpc.testing.TestService/FullDuplexCall", grpc.WaitForReady(true))
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadGateway)
				return
			}
			if cctx.Err() != nil {
				http.Error(w, cctx.Err().Error(), http.StatusGatewayTimeout)
				return
			}
			mu.Lock()
			open = append(open, s)
			mu.Unlock()
		}
	})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go hs.Serve(lis) //nolint:errcheck // ends with Close below
	defer hs.Close()

	if err := json.NewEncoder(os.Stdout).Encode(childInfo{Addr: addr.String(), Stats: "http://" + lis.Addr().String()}); err != nil {
		return 2
	}
	if err := <-served; err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}

// childOptions are the server's options for cfg. The API server's client
// counts and optionally slows down every review.
func childOptions(cfg childConfig, tokenReviews, accessReviews, delay *atomic.Int64) ([]server.Option, error) {
	var opts []server.Option
	if cfg.Heartbeat > 0 {
		opts = append(opts, server.WithHeartbeatInterval(cfg.Heartbeat))
	}
	if cfg.ConnIdle > 0 {
		opts = append(opts, server.WithConnectionIdleTimeout(cfg.ConnIdle))
	}
	switch cfg.Mode {
	case "anonymous":
		return append(opts, server.WithInsecureNoAuthentication()), nil
	case "builtin":
		rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
		if err != nil {
			return nil, err
		}
		rc.QPS, rc.Burst = 1000, 1000 // the server's own limits are what is tested, not client-go's
		rc.Wrap(func(rt http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				switch path := r.URL.Path; {
				case strings.HasSuffix(path, "/tokenreviews"):
					tokenReviews.Add(1)
				case strings.HasSuffix(path, "/subjectaccessreviews"):
					accessReviews.Add(1)
				default:
					return rt.RoundTrip(r)
				}
				if d := time.Duration(delay.Load()); d > 0 {
					select {
					case <-time.After(d):
					case <-r.Context().Done():
						return nil, r.Context().Err()
					}
				}
				return rt.RoundTrip(r)
			})
		})
		kc, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return nil, err
		}
		authOpts, err := auth.BuiltIn(kc, []string{cfg.Audience})
		if err != nil {
			return nil, err
		}
		return append(opts, authOpts...), nil
	}
	return nil, fmt.Errorf("unknown mode %q", cfg.Mode)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
