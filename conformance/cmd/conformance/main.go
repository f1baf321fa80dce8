// Command conformance runs the conformance suite against plugin programs:
//
//	conformance --plugin-cmd go=/path/to/plugin [--plugin-cmd 'python=python3 -m x'] [--run REGEXP] [-v]
//
// It plays the operator with the framework's Go server (and, in the raw
// cases, a peer speaking raw frames), starts each plugin program for each
// case with its settings in OPF_CONFORMANCE_* variables, and prints a line
// per case and "NAME: N passed, N failed" per SDK, then a total line. It
// exits 1 when a case failed, 2 when the run could not be made.
// docs/conformance.md has the details.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/guilhem/operator-plugin-framework/conformance"
)

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ", ") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

var sdkName = regexp.MustCompile(`^[a-z][a-z0-9_-]*=`)

// splitNamed splits "NAME=VALUE"; without a NAME= prefix the name is def.
func splitNamed(v, def string) (string, string) {
	if loc := sdkName.FindStringIndex(v); loc != nil {
		return v[:loc[1]-1], v[loc[1]:]
	}
	return def, v
}

func main() {
	os.Exit(run())
}

func run() int {
	var pluginCmds, knownFailing listFlag
	fs := flag.NewFlagSet("conformance", flag.ContinueOnError)
	fs.Var(&pluginCmds, "plugin-cmd", "`[NAME=]COMMAND` of a plugin program under test, split into words as a shell would but not run by one (repeatable; NAME defaults to --sdk)")
	sdk := fs.String("sdk", "plugin", "name of the SDK of a --plugin-cmd given without NAME=")
	fs.Var(&knownFailing, "known-failing", "`[NAME=]FILE` replacing the embedded known-failing list of an SDK (repeatable)")
	operatorCases := fs.String("operator-cases", "go", "comma-separated SDK names that also run the cases testing the operator (the framework's Go server)")
	runPattern := fs.String("run", "", "run only the cases whose name matches this regular expression")
	list := fs.Bool("list", false, "list the cases and exit")
	verbose := fs.Bool("v", false, "print the logs of passing cases too")
	grace := fs.Duration("grace", 5*time.Second, "how long a plugin may take to exit after SIGTERM before it is killed")
	parallel := fs.Int("parallel", 4, "how many cases run at once (cases marked exclusive run alone, after the others)")
	seed := fs.Uint64("seed", 0, "seed of the cases' random choices (payload sizes and contents); 0 picks one, printed first")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	cases, err := conformance.LoadCases()
	if err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		return 2
	}
	var filter *regexp.Regexp
	if *runPattern != "" {
		if filter, err = regexp.Compile(*runPattern); err != nil {
			fmt.Fprintln(os.Stderr, "conformance: --run:", err)
			return 2
		}
	}
	if *list {
		for _, c := range cases {
			if filter != nil && !filter.MatchString(c.Name) {
				continue
			}
			side := "plugin"
			if c.TestsOperator() {
				side = "operator"
			}
			fmt.Printf("%-52s %-8s %s\n", c.Name, side, strings.Join(strings.Fields(c.Checks), " "))
		}
		return 0
	}
	if len(pluginCmds) == 0 {
		fmt.Fprintln(os.Stderr, "conformance: no --plugin-cmd given")
		fs.Usage()
		return 2
	}
	operatorSDKs := strings.Split(*operatorCases, ",")
	var sdks []conformance.SDK
	for _, pc := range pluginCmds {
		name, command := splitNamed(pc, *sdk)
		argv, err := splitWords(command)
		if err != nil {
			fmt.Fprintf(os.Stderr, "conformance: --plugin-cmd %s: %v\n", name, err)
			return 2
		}
		kf, err := conformance.KnownFailing(name)
		if err != nil {
			fmt.Fprintln(os.Stderr, "conformance:", err)
			return 2
		}
		sdks = append(sdks, conformance.SDK{
			Name:          name,
			Command:       argv,
			KnownFailing:  kf,
			OperatorCases: slices.Contains(operatorSDKs, name),
		})
	}
	for _, kf := range knownFailing {
		name, file := splitNamed(kf, *sdk)
		i := slices.IndexFunc(sdks, func(s conformance.SDK) bool { return s.Name == name })
		if i < 0 {
			fmt.Fprintf(os.Stderr, "conformance: --known-failing for %s, which has no --plugin-cmd\n", name)
			return 2
		}
		if sdks[i].KnownFailing, err = conformance.ReadKnownFailing(file); err != nil {
			fmt.Fprintln(os.Stderr, "conformance:", err)
			return 2
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sum, err := conformance.Run(ctx, conformance.Config{
		SDKs:     sdks,
		Cases:    cases,
		Filter:   filter,
		Verbose:  *verbose,
		Grace:    *grace,
		Seed:     *seed,
		Parallel: *parallel,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		if errors.Is(err, context.Canceled) {
			return 1
		}
		return 2
	}
	if !sum.OK() {
		return 1
	}
	return 0
}

func splitWords(s string) ([]string, error) { return conformance.SplitCommand(s) }
