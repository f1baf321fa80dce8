package conformance

import (
	"bufio"
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The known-failing lists, one per SDK: known_failing/NAME.txt.
//
//go:embed known_failing
var knownFailingFiles embed.FS

// SDK is one plugin implementation under test.
type SDK struct {
	// Name labels the SDK in the output and picks its known-failing list.
	Name string
	// Command runs the plugin program (argv, not through a shell).
	Command []string
	// KnownFailing maps the names of cases expected to fail to why.
	KnownFailing map[string]string
	// OperatorCases also runs the cases that test the operator (the
	// framework's Go server) rather than the plugin; their results count
	// for this SDK. The runner sets it for the Go SDK, whose server it is.
	OperatorCases bool
}

// Config is what Run runs.
type Config struct {
	SDKs []SDK
	// Cases to run; LoadCases() when nil.
	Cases []*Case
	// Filter selects cases by name; nil runs them all.
	Filter *regexp.Regexp
	// Out receives the report (os.Stdout when nil).
	Out io.Writer
	// Verbose prints the log of every case, not only of failing ones.
	Verbose bool
	// Grace is how long a plugin may take to exit after SIGTERM before it
	// is killed. Default 5 s.
	Grace time.Duration
	// Parallel is how many cases run at once (default 1); cases marked
	// exclusive run alone.
	Parallel int
	// Seed makes the random choices of the cases (payload sizes and
	// contents); each case derives its own from it and its name, so that
	// one case can be rerun alone with the same choices. 0 picks one.
	Seed uint64
}

// Result is the outcome of one case for one SDK.
type Result struct {
	SDK, Case string
	Err       error  // nil when the case passed
	Known     string // the known-failing reason, when listed
	Took      time.Duration
}

// Failed reports whether the result fails the run: an unlisted case that
// failed, or a listed case that passed.
func (r Result) Failed() bool { return (r.Err != nil) != (r.Known != "") }

// Summary counts results.
type Summary struct {
	Results []Result
}

// Counts returns passed and failed counts for sdk ("" for all).
func (s Summary) Counts(sdk string) (passed, failed int) {
	for _, r := range s.Results {
		if sdk != "" && r.SDK != sdk {
			continue
		}
		if r.Failed() {
			failed++
		} else {
			passed++
		}
	}
	return passed, failed
}

// OK reports whether nothing failed.
func (s Summary) OK() bool {
	_, failed := s.Counts("")
	return failed == 0
}

// KnownFailing returns the embedded known-failing list of an SDK (empty when
// it has none).
func KnownFailing(sdk string) (map[string]string, error) {
	data, err := knownFailingFiles.ReadFile("known_failing/" + sdk + ".txt")
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseKnownFailing(strings.NewReader(string(data)))
}

// ParseKnownFailing reads a known-failing list: one case name per line,
// followed by "#" and the reason; blank lines and lines starting with "#"
// are ignored.
func ParseKnownFailing(r io.Reader) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, reason, ok := strings.Cut(line, "#")
		name, reason = strings.TrimSpace(name), strings.TrimSpace(reason)
		if !ok || reason == "" || strings.ContainsAny(name, " \t") {
			return nil, fmt.Errorf("line %d: want \"case/name  # why it fails\"", n)
		}
		out[name] = reason
	}
	return out, sc.Err()
}

// ReadKnownFailing reads a known-failing list from a file.
func ReadKnownFailing(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseKnownFailing(f)
}

// Run runs the selected cases against every SDK and prints a report ending
// with a "NAME: N passed, N failed" line per SDK and a total line. The
// error is for a run that could not be made; failing cases are in the
// summary.
func Run(ctx context.Context, cfg Config) (Summary, error) {
	out := cfg.Out
	if out == nil {
		out = os.Stdout
	}
	if cfg.Grace == 0 {
		cfg.Grace = 5 * time.Second
	}
	if cfg.Seed == 0 {
		cfg.Seed = uint64(time.Now().UnixNano())
	}
	fmt.Fprintf(out, "seed %d\n", cfg.Seed)
	cases := cfg.Cases
	if cases == nil {
		var err error
		if cases, err = LoadCases(); err != nil {
			return Summary{}, err
		}
	}
	names := map[string]bool{}
	for _, c := range cases {
		names[c.Name] = true
	}
	for _, sdk := range cfg.SDKs {
		for name := range sdk.KnownFailing {
			if !names[name] {
				return Summary{}, fmt.Errorf("known-failing list of %s: no case named %q", sdk.Name, name)
			}
		}
	}
	type job struct {
		sdk SDK
		c   *Case
		i   int
	}
	var jobs, exclusive []job
	for _, sdk := range cfg.SDKs {
		for _, c := range cases {
			if cfg.Filter != nil && !cfg.Filter.MatchString(c.Name) {
				continue
			}
			if c.TestsOperator() && !sdk.OperatorCases {
				continue
			}
			j := job{sdk: sdk, c: c, i: len(jobs) + len(exclusive)}
			if c.Exclusive || cfg.Parallel <= 1 {
				exclusive = append(exclusive, j)
			} else {
				jobs = append(jobs, j)
			}
		}
	}
	results := make([]Result, len(jobs)+len(exclusive))
	var outMu sync.Mutex
	run := func(j job) {
		if ctx.Err() != nil {
			return
		}
		res, logs := runCase(ctx, cfg, j.sdk, j.c)
		results[j.i] = res
		outMu.Lock()
		report(out, cfg, j.c, res, logs)
		outMu.Unlock()
	}
	// Cases run Parallel at a time; exclusive ones (heavy or tightly timed)
	// alone, after the others, so that they get the machine to themselves.
	queue := make(chan job)
	var wg sync.WaitGroup
	for range max(cfg.Parallel, 1) {
		wg.Go(func() {
			for j := range queue {
				run(j)
			}
		})
	}
	for _, j := range jobs {
		queue <- j
	}
	close(queue)
	wg.Wait()
	for _, j := range exclusive {
		run(j)
	}
	if ctx.Err() != nil {
		return Summary{}, ctx.Err()
	}
	sum := Summary{Results: results}
	fmt.Fprintln(out)
	for _, sdk := range cfg.SDKs {
		p, f := sum.Counts(sdk.Name)
		fmt.Fprintf(out, "%s: %d passed, %d failed\n", sdk.Name, p, f)
	}
	p, f := sum.Counts("")
	fmt.Fprintf(out, "total: %d passed, %d failed\n", p, f)
	return sum, nil
}

// caseLogs is what a case printed: the runner's log and each plugin's
// output.
type caseLogs struct {
	runner  string
	plugins []string
}

func report(out io.Writer, cfg Config, c *Case, r Result, logs caseLogs) {
	took := r.Took.Round(time.Millisecond)
	switch {
	case r.Err == nil && r.Known == "":
		fmt.Fprintf(out, "ok    %s %s (%v)\n", r.SDK, r.Case, took)
	case r.Err != nil && r.Known != "":
		fmt.Fprintf(out, "xfail %s %s (%v): known failing: %s\n", r.SDK, r.Case, took, r.Known)
		fmt.Fprintf(out, "      %v\n", indent(r.Err.Error(), "      "))
	case r.Err == nil:
		fmt.Fprintf(out, "FAIL  %s %s (%v): passed, but it is in the known-failing list of %s (%s): remove it from there\n", r.SDK, r.Case, took, r.SDK, r.Known)
	default:
		fmt.Fprintf(out, "FAIL  %s %s (%v)\n", r.SDK, r.Case, took)
		fmt.Fprintf(out, "      checks: %s\n", indent(strings.TrimSpace(c.Checks), "      "))
		fmt.Fprintf(out, "      %s\n", indent(r.Err.Error(), "      "))
	}
	if !cfg.Verbose && !r.Failed() {
		return
	}
	for i, p := range logs.plugins {
		if strings.TrimSpace(p) == "" {
			continue
		}
		fmt.Fprintf(out, "      --- plugin %d output (stdout and stderr):\n%s\n", i, indent("      "+tail(p, 60), "      "))
	}
	if strings.TrimSpace(logs.runner) != "" {
		fmt.Fprintf(out, "      --- runner log:\n%s\n", indent("      "+tail(logs.runner, 60), "      "))
	}
}

func indent(s, prefix string) string {
	return strings.ReplaceAll(s, "\n", "\n"+prefix)
}

// runCase runs one case for one SDK.
func runCase(ctx context.Context, cfg Config, sdk SDK, c *Case) (Result, caseLogs) {
	res := Result{SDK: sdk.Name, Case: c.Name, Known: sdk.KnownFailing[c.Name]}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.WithValue(ctx, sdkKey{}, sdk.Name), c.Timeout.D(60*time.Second))
	defer cancel()
	r := &caseRun{c: c, sdk: sdk, grace: cfg.Grace, log: &syncBuffer{}, start: start, calls: map[string]*bgCall{}, seed: caseSeed(cfg.Seed, c.Name), runSeed: cfg.Seed}
	err := r.setup(ctx)
	if err == nil {
		err = r.steps(ctx)
	}
	err = errors.Join(err, r.teardown())
	res.Err = err
	res.Took = time.Since(start)
	logs := caseLogs{runner: r.log.String()}
	for _, p := range r.plugins {
		logs.plugins = append(logs.plugins, p.output.String())
	}
	return res, logs
}

// logf appends a line to the case's log.
func (r *caseRun) logf(format string, args ...any) {
	fmt.Fprintf(r.log, "%8.3fs %s\n", time.Since(r.start).Seconds(), fmt.Sprintf(format, args...))
}

func (r *caseRun) setup(ctx context.Context) error {
	dir, err := os.MkdirTemp("", "opfc")
	if err != nil {
		return err
	}
	r.dir = dir
	r.sock = filepath.Join(dir, "op.sock")
	if r.c.Operator.TLS {
		if r.tls, err = newTLSMaterial(dir); err != nil {
			return err
		}
	}
	op := r.c.Operator
	if op.tcp() {
		if r.replicas, err = newReplicaSet(op.replicas(), op.Aliases, op.Balanced, op.ListedTwice, r.logf); err != nil {
			return err
		}
		r.logf("operators on %v; the plugin's target is %s", r.replicas.addrs, r.replicas.target)
	}
	for i := range op.replicas() {
		switch {
		case op.Kind == "raw":
			var lis net.Listener
			if r.replicas != nil {
				lis, err = r.replicas.listener(i)
			} else {
				lis, err = listenUnix(r.sock)
			}
			if err != nil {
				return err
			}
			r.rawOps = append(r.rawOps, startRawOperator(lis, nil, r.logf))
		case r.replicas != nil:
			r.ops = append(r.ops, newReplicaOperator(op, i, r.replicas, r.logf))
		default:
			r.ops = append(r.ops, newRealOperator(op, r.sock, r.tls, r.logf))
		}
	}
	for _, o := range r.ops {
		if err := o.start(); err != nil {
			return err
		}
	}
	if len(r.ops) > 0 {
		r.op = r.ops[0]
	}
	if len(r.rawOps) > 0 {
		r.rawOp = r.rawOps[0]
	}
	for range r.c.instances() {
		if err := r.startPlugin(); err != nil {
			return err
		}
	}
	if r.op != nil && r.c.instances() > 0 && (r.c.Plugin.WaitRegistered == nil || *r.c.Plugin.WaitRegistered) {
		n := r.c.instances()
		if err := r.registered(ctx, &RegisteredStep{Count: &n, Within: Duration(10 * time.Second)}); err != nil {
			return fmt.Errorf("before the steps: %w", err)
		}
	}
	return nil
}

func (r *caseRun) target() string {
	if r.replicas != nil {
		return r.replicas.target
	}
	return "unix://" + r.sock
}

func (r *caseRun) pluginEnv() []string {
	env := []string{
		EnvTarget + "=" + r.target(),
		EnvPluginName + "=" + r.c.pluginName(),
		EnvPluginVersion + "=" + PluginVersion,
		EnvDrainTimeoutMS + "=" + strconv.FormatInt(r.c.Plugin.DrainTimeout.D(2*time.Second).Milliseconds(), 10),
	}
	if n := r.c.Plugin.MaxMessageSize; n > 0 {
		env = append(env, EnvMaxMessageSize+"="+strconv.Itoa(int(n)))
	}
	if t := r.c.Operator.Token; t != "" {
		env = append(env, EnvToken+"="+t)
	}
	if r.tls != nil {
		env = append(env, EnvTLSCA+"="+r.tls.caFile, EnvTLSServerName+"="+r.tls.serverName)
	}
	return env
}

func (r *caseRun) startPlugin() error {
	i := len(r.plugins)
	p, err := startPlugin(i, r.sdk.Command, r.pluginEnv())
	if err != nil {
		return err
	}
	r.logf("started plugin %d (pid %d)", i, p.cmd.Process.Pid)
	r.plugins = append(r.plugins, p)
	return nil
}

// teardown stops everything the case started and reports a plugin that did
// not exit cleanly.
func (r *caseRun) teardown() error {
	var errs []error
	for _, bg := range r.calls {
		bg.cancel()
	}
	for id, bg := range r.calls {
		select {
		case <-bg.done:
		case <-time.After(5 * time.Second):
			errs = append(errs, fmt.Errorf("background call %q did not end after its cancellation", id))
		}
	}
	if r.restarting != nil {
		if err := <-r.restarting; err != nil {
			errs = append(errs, err)
		}
	}
	for _, stop := range r.rawStops {
		stop()
	}
	for _, op := range r.rawOps {
		op.stop()
	}
	for _, p := range r.plugins {
		if p.termAt.IsZero() && p.exited() {
			p.checked = true
			errs = append(errs, fmt.Errorf("plugin %d exited during the case: %v", p.index, p.err))
			continue
		}
		p.terminate()
	}
	for _, p := range r.plugins {
		if p.checked {
			continue
		}
		p.checked = true
		if err := p.wait(r.grace); err != nil {
			errs = append(errs, err)
		}
	}
	for i, op := range r.ops {
		if err := op.stop(false); err != nil {
			errs = append(errs, fmt.Errorf("stopping server %d: %w", i, err))
		}
	}
	if r.replicas != nil {
		r.replicas.stop()
	}
	if r.dir != "" {
		os.RemoveAll(r.dir)
	}
	return errors.Join(errs...)
}
