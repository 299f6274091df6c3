//! The controller: talks to nothing but the Kubernetes API.
