// Pinned protoc plugins, built into .bin/ by `go run mage.go tools`.
// Kept apart from the framework's module so their dependencies never leak
// into it, and apart from buf (tools/buf) whose protobuf requirement differs.
module github.com/guilhem/operator-plugin-framework/tools

go 1.26

tool (
	google.golang.org/grpc/cmd/protoc-gen-go-grpc
	google.golang.org/protobuf/cmd/protoc-gen-go
)

require (
	google.golang.org/grpc/cmd/protoc-gen-go-grpc v1.6.2 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
)
