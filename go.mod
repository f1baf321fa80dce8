// Module for the repository's build tooling (magefile.go, mage.go).
// The framework itself is the module under go/.
module github.com/guilhem/operator-plugin-framework

go 1.26

require github.com/magefile/mage v1.17.2
