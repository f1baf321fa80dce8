package conformance

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
)

// The environment variables the plugin under test reads
// (docs/conformance.md, "The plugin program").
const (
	EnvTarget         = "OPF_CONFORMANCE_TARGET"
	EnvPluginName     = "OPF_CONFORMANCE_PLUGIN_NAME"
	EnvPluginVersion  = "OPF_CONFORMANCE_PLUGIN_VERSION"
	EnvToken          = "OPF_CONFORMANCE_TOKEN"
	EnvTLSCA          = "OPF_CONFORMANCE_TLS_CA"
	EnvTLSServerName  = "OPF_CONFORMANCE_TLS_SERVER_NAME"
	EnvMaxMessageSize = "OPF_CONFORMANCE_MAX_MESSAGE_SIZE"
	EnvDrainTimeoutMS = "OPF_CONFORMANCE_DRAIN_TIMEOUT_MS"
)

// PluginVersion is the version handed to plugins under test.
const PluginVersion = "v0.0.0-conformance"

// pluginProc is one running plugin process.
type pluginProc struct {
	index   int
	cmd     *exec.Cmd
	output  *syncBuffer
	done    chan struct{} // closed once the process has exited
	err     error         // its exit status, set before done closes
	termAt  time.Time     // when SIGTERM was sent; zero before
	checked bool          // its exit has been checked
}

// startPlugin runs argv with env added to the runner's environment, in its
// own process group.
func startPlugin(index int, argv []string, env []string) (*pluginProc, error) {
	if len(argv) == 0 {
		return nil, errors.New("empty plugin command")
	}
	out := &syncBuffer{}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start plugin %q: %w", strings.Join(argv, " "), err)
	}
	p := &pluginProc{index: index, cmd: cmd, output: out, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *pluginProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// terminate sends SIGTERM to the plugin's process group, once, as a kubelet
// does: a second one could land after the plugin has put back the default
// action on its way out and kill a plugin that was exiting cleanly.
func (p *pluginProc) terminate() {
	if !p.termAt.IsZero() {
		return
	}
	p.termAt = time.Now()
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
}

// wait waits up to within for the plugin to exit after SIGTERM, kills it
// otherwise, and reports a plugin that did not exit cleanly in time.
func (p *pluginProc) wait(within time.Duration) error {
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		p.dump()
		p.kill()
		return fmt.Errorf("plugin %d did not exit within %v of SIGTERM (sent SIGQUIT, then killed)", p.index, within)
	}
	// Whatever it started goes too.
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	if p.err != nil {
		return fmt.Errorf("plugin %d exited after SIGTERM with %v, want status 0", p.index, p.err)
	}
	return nil
}

// dumpWait is how long a plugin has to print where it is after SIGQUIT.
const dumpWait = 500 * time.Millisecond

// dump sends SIGQUIT, so that a plugin stuck on its way out says where:
// a Go program prints its goroutines, the Python one its asyncio tasks.
func (p *pluginProc) dump() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGQUIT)
	select {
	case <-p.done:
	case <-time.After(dumpWait):
	}
}

func (p *pluginProc) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// SplitCommand splits a command line into words as a POSIX shell would,
// with single and double quotes and backslashes, but no expansion.
func SplitCommand(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	var quote rune
	escaped := false
	for _, r := range s {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped = false
		case quote == '\'':
			if r == '\'' {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case quote == '"':
			switch r {
			case '"':
				quote = 0
			case '\\':
				escaped = true
			default:
				cur.WriteRune(r)
			}
		case r == '\\':
			escaped, inWord = true, true
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case unicode.IsSpace(r):
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 || escaped {
		return nil, fmt.Errorf("unterminated quote or escape in %q", s)
	}
	if inWord {
		words = append(words, cur.String())
	}
	if len(words) == 0 {
		return nil, errors.New("empty command")
	}
	return words, nil
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("… (%d lines before)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
