//go:build tools

// Package tools pins the S3-compatible object store that hack/cluster-bins.sh builds for tests.
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum complete.
package tools

import (
	_ "github.com/versity/versitygw/cmd/versitygw"
)
