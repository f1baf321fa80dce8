package examples_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestREADME checks that every Go snippet of the repository's README and
// of docs/operators.md is a piece of the code of examples/ or go/
// (indentation aside), so that the docs only show code that compiles and
// that the examples and tests run.
func TestREADME(t *testing.T) {
	var sources [][]string
	for _, root := range []string{".", filepath.Join("..", "go")} {
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sources = append(sources, trimmedLines(string(b)))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, doc := range []string{"README.md", filepath.Join("docs", "operators.md")} {
		md, err := os.ReadFile(filepath.Join("..", doc))
		if err != nil {
			t.Fatal(err)
		}
		snippets := goSnippets(string(md))
		if len(snippets) == 0 {
			t.Fatalf("no Go snippet in %s", doc)
		}
		for _, snippet := range snippets {
			want := trimmedLines(snippet)
			if !slices.ContainsFunc(sources, func(src []string) bool { return containsRun(src, want) }) {
				t.Errorf("%s shows code found in no .go file of examples/ or go/:\n%s", doc, snippet)
			}
		}
	}
}

// goSnippets returns the contents of the README's ```go blocks.
func goSnippets(md string) []string {
	var out []string
	for _, block := range strings.Split(md, "```go\n")[1:] {
		end := strings.Index(block, "```")
		if end < 0 {
			break
		}
		out = append(out, block[:end])
	}
	return out
}

func trimmedLines(s string) []string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimSpace(l)
	}
	return lines
}

// containsRun reports whether want appears in lines as consecutive lines.
func containsRun(lines, want []string) bool {
	for i := 0; i+len(want) <= len(lines); i++ {
		if slices.Equal(lines[i:i+len(want)], want) {
			return true
		}
	}
	return false
}
