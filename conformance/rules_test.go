package conformance

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// The rule table of docs/conformance.md maps every rule id of
// docs/tunnel-spec.md to the cases that check it, or says why none does.
// It fails when a spec id is missing from the table, when the table names
// an id the spec does not have or a case that does not exist, or leaves a
// rule without a case and without a reason.

var (
	// A tag at a rule; one quoted in backticks (the spec's conventions
	// show one) is an example, not a rule.
	specRuleID = regexp.MustCompile("(?:^|[^`])\\[(R[0-9]+(?:\\.[0-9]+)*-[0-9]+)\\]")
	tableRow   = regexp.MustCompile(`^\|\s*(R[0-9]+(?:\.[0-9]+)*-[0-9]+)\s*\|([^|]*)\|([^|]*)\|\s*$`)
	caseRef    = regexp.MustCompile("`([^`]+)`")
	// A row that starts like a rule's, to report one that is malformed.
	looksLikeRule = regexp.MustCompile(`^\| ?R[0-9]`)
)

func TestRuleTable(t *testing.T) {
	spec, err := os.ReadFile("../docs/tunnel-spec.md")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../docs/conformance.md")
	if err != nil {
		t.Fatal(err)
	}
	cases, err := LoadCases()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, c := range cases {
		names[c.Name] = true
	}

	inSpec := map[string]bool{}
	for _, m := range specRuleID.FindAllStringSubmatch(string(spec), -1) {
		if inSpec[m[1]] {
			t.Errorf("docs/tunnel-spec.md tags two rules %s", m[1])
		}
		inSpec[m[1]] = true
	}
	if len(inSpec) < 100 {
		t.Fatalf("only %d rule ids in docs/tunnel-spec.md", len(inSpec))
	}

	inTable := map[string]bool{}
	uncovered := 0
	for n, line := range strings.Split(string(doc), "\n") {
		m := tableRow.FindStringSubmatch(line)
		if m == nil {
			if looksLikeRule.MatchString(line) {
				t.Errorf("docs/conformance.md:%d: a rule row must read | ID | cases | note |: %q", n+1, line)
			}
			continue
		}
		id, casesCell, note := m[1], strings.TrimSpace(m[2]), strings.TrimSpace(m[3])
		if inTable[id] {
			t.Errorf("docs/conformance.md:%d: %s listed twice", n+1, id)
		}
		inTable[id] = true
		if !inSpec[id] {
			t.Errorf("docs/conformance.md:%d: %s is no rule of docs/tunnel-spec.md", n+1, id)
		}
		refs := caseRef.FindAllStringSubmatch(casesCell, -1)
		if casesCell == "—" || len(refs) == 0 {
			uncovered++
			if casesCell != "—" {
				t.Errorf("docs/conformance.md:%d: %s: list cases in backticks, or write — and why", n+1, id)
			}
			if note == "" {
				t.Errorf("docs/conformance.md:%d: %s has no case: say why in the note", n+1, id)
			}
			continue
		}
		for _, r := range refs {
			if !names[r[1]] {
				t.Errorf("docs/conformance.md:%d: %s names %q, which is no case", n+1, id, r[1])
			}
		}
	}
	for id := range inSpec {
		if !inTable[id] {
			t.Errorf("rule %s of docs/tunnel-spec.md is not in the table of docs/conformance.md", id)
		}
	}
	t.Logf("%d rules, %d checked by cases, %d not", len(inSpec), len(inSpec)-uncovered, uncovered)
}
