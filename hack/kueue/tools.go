//go:build tools

// Package tools pins the Kueue controller that hack/cluster-bins.sh builds for the cluster tests.
// It is never compiled (build tag "tools"); it only keeps go.mod/go.sum complete.
package tools

import (
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
