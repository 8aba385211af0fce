//! Hearth's integration tests: real `hearth` processes on loopback.
//!
//! One test binary with a module per concern, run by libtest-mimic so that a test which cannot run
//! here (no NVIDIA GPU, say) is reported as ignored, with the reason printed, rather than passing
//! silently.

mod api_errors;
mod api_security;
mod availability;
mod browser_session;
mod cli;
mod client_crate;
mod daemon;
mod daemon_jobs;
mod escape;
mod events;
mod flood;
mod follow;
mod gpu_market;
mod hostile_clocks;
mod hostile_jobs;
mod hostile_market;
mod images;
mod job_network;
mod jobs;
mod layers;
mod ledger;
mod ledger_crash;
mod market;
mod network;
mod packages;
mod protocol;
mod resources;
mod submit_by_content;
mod transfer;
mod wire;

use libtest_mimic::{Arguments, Failed, Trial};

type TestFn = fn() -> anyhow::Result<()>;

fn trial(name: &str, test: TestFn) -> Trial {
    Trial::test(name, move || test().map_err(|e| Failed::from(format!("{e:#}"))))
}

/// A test that only runs where `available` holds; otherwise it is ignored, and says why loudly.
fn trial_if(name: &str, test: TestFn, available: bool, missing: &str) -> Trial {
    if !available {
        eprintln!("SKIPPED {name}: {missing}");
    }
    trial(name, test).with_ignored_flag(!available)
}

/// Whether `python3` runs here (the verifiers written from the docs are Python).
fn python_present() -> bool {
    std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn main() {
    let args = Arguments::from_args();
    let gpu = hearth_tests::nvidia_gpu_present();
    let sandbox = hearth_tests::jobs::sandbox_support();
    let kernel_disk = sandbox.clone().and_then(|()| hostile_jobs::kernel_disk_limit());
    let sandboxed = |name: &str, test: TestFn| {
        trial_if(name, test, sandbox.is_ok(), sandbox.as_ref().err().map_or("", String::as_str))
    };
    // Jobs in network namespaces: the sandbox, `ip netns` (root), and slirp4netns for granted network.
    let networked = sandbox.clone().and_then(|()| hearth_tests::netns::support()).and_then(|()| {
        match hearth_tests::netns::installed("slirp4netns") {
            true => Ok(()),
            false => Err("slirp4netns is not installed (`apt install slirp4netns`)".to_owned()),
        }
    });
    let in_netns = |name: &str, test: TestFn| {
        trial_if(name, test, networked.is_ok(), networked.as_ref().err().map_or("", String::as_str))
    };
    // Homes behind NAT: namespaces, and nftables for the routers' masquerade.
    let natted = hearth_tests::netns::support().and_then(|()| match hearth_tests::netns::installed("nft") {
        true => Ok(()),
        false => Err("nft is not installed (`apt install nftables`)".to_owned()),
    });
    let python = python_present();
    let trials = vec![
        trial("daemon::identity_persists_across_restarts", daemon::identity_persists_across_restarts),
        sandboxed(
            "client_crate::a_client_of_the_client_crate_alone_does_what_the_cli_does",
            client_crate::a_client_of_the_client_crate_alone_does_what_the_cli_does,
        ),
        sandboxed(
            "submit_by_content::a_job_from_a_folder_the_daemon_cannot_see_runs",
            submit_by_content::a_job_from_a_folder_the_daemon_cannot_see_runs,
        ),
        sandboxed(
            "submit_by_content::a_remote_job_from_a_folder_the_daemon_cannot_see_runs",
            submit_by_content::a_remote_job_from_a_folder_the_daemon_cannot_see_runs,
        ),
        trial(
            "submit_by_content::a_package_keeps_its_upload_until_it_ends_and_a_restart_sweeps_strays",
            submit_by_content::a_package_keeps_its_upload_until_it_ends_and_a_restart_sweeps_strays,
        ),
        trial(
            "submit_by_content::hostile_uploads_are_refused_and_leave_nothing",
            submit_by_content::hostile_uploads_are_refused_and_leave_nothing,
        ),
        trial("daemon::second_daemon_on_the_same_dir_refuses", daemon::second_daemon_on_the_same_dir_refuses),
        trial(
            "daemon::sigterm_stops_cleanly_and_the_store_is_intact",
            daemon::sigterm_stops_cleanly_and_the_store_is_intact,
        ),
        trial("daemon::sigint_stops_cleanly", daemon::sigint_stops_cleanly),
        trial("daemon::restart_after_kill_9_recovers", daemon::restart_after_kill_9_recovers),
        trial(
            "ledger::the_ledger_docs_test_vectors_are_what_the_code_computes",
            ledger::the_ledger_docs_test_vectors_are_what_the_code_computes,
        ),
        sandboxed(
            "ledger::a_finished_job_leaves_the_same_countersigned_receipt_in_both_ledgers",
            ledger::a_finished_job_leaves_the_same_countersigned_receipt_in_both_ledgers,
        ),
        sandboxed(
            "hostile_jobs::sparse_outputs_count_at_their_full_size_and_over_the_disk_keep_nothing",
            hostile_jobs::sparse_outputs_count_at_their_full_size_and_over_the_disk_keep_nothing,
        ),
        sandboxed(
            "hostile_jobs::a_jobs_outputs_keep_no_setuid_file_link_or_device_at_any_depth",
            hostile_jobs::a_jobs_outputs_keep_no_setuid_file_link_or_device_at_any_depth,
        ),
        sandboxed(
            "hostile_jobs::a_job_cannot_send_escape_sequences_to_its_consumers_terminal",
            hostile_jobs::a_job_cannot_send_escape_sequences_to_its_consumers_terminal,
        ),
        trial_if(
            "hostile_jobs::a_job_cannot_write_past_its_disk_by_unlinking_or_in_a_burst",
            hostile_jobs::a_job_cannot_write_past_its_disk_by_unlinking_or_in_a_burst,
            kernel_disk.is_ok(),
            kernel_disk.as_ref().err().map_or("", String::as_str),
        ),
        trial_if(
            "hostile_jobs::a_jobs_root_is_nobody_on_the_host_and_sees_no_host_path",
            hostile_jobs::a_jobs_root_is_nobody_on_the_host_and_sees_no_host_path,
            kernel_disk.is_ok(),
            "needs an agent running as root (only root's jobs get a range of ids) with a disk image \
             (only an image's folders show no host path)",
        ),
        sandboxed(
            "hostile_jobs::a_job_that_floods_its_output_leaves_the_provider_memory_bounded",
            hostile_jobs::a_job_that_floods_its_output_leaves_the_provider_memory_bounded,
        ),
        trial(
            "hostile_market::reservations_hold_only_for_their_signer_and_only_what_they_say",
            hostile_market::reservations_hold_only_for_their_signer_and_only_what_they_say,
        ),
        sandboxed(
            "packages::two_gpus_after_a_cpu_machine_are_acquired_in_order_and_run_their_tasks_in_order",
            packages::two_gpus_after_a_cpu_machine_are_acquired_in_order_and_run_their_tasks_in_order,
        ),
        sandboxed(
            "packages::a_refusing_provider_brings_retries_then_a_rollback_that_leaves_nothing_held",
            packages::a_refusing_provider_brings_retries_then_a_rollback_that_leaves_nothing_held,
        ),
        trial(
            "packages::an_invalid_package_or_a_bad_token_is_refused_and_queues_nothing",
            packages::an_invalid_package_or_a_bad_token_is_refused_and_queues_nothing,
        ),
        sandboxed(
            "packages::a_consumer_killed_mid_acquisition_ends_its_request_cleanly_after_a_restart",
            packages::a_consumer_killed_mid_acquisition_ends_its_request_cleanly_after_a_restart,
        ),
        trial(
            "ledger_crash::kill_9_during_appends_loses_no_acknowledged_receipt",
            ledger_crash::kill_9_during_appends_loses_no_acknowledged_receipt,
        ),
        trial(
            "daemon::bad_config_names_the_field_and_writes_nothing",
            daemon::bad_config_names_the_field_and_writes_nothing,
        ),
        trial("daemon::busy_port_names_the_setting", daemon::busy_port_names_the_setting),
        trial("daemon::corrupt_identity_is_reported_and_kept", daemon::corrupt_identity_is_reported_and_kept),
        trial(
            "daemon::environment_and_flags_override_the_file",
            daemon::environment_and_flags_override_the_file,
        ),
        trial(
            "daemon::log_level_flag_and_rust_log_are_respected",
            daemon::log_level_flag_and_rust_log_are_respected,
        ),
        trial(
            "api_errors::malformed_bodies_are_refused_with_an_error_body_and_change_nothing",
            api_errors::malformed_bodies_are_refused_with_an_error_body_and_change_nothing,
        ),
        trial(
            "api_errors::paths_and_queries_that_do_not_parse_are_400_with_an_error_body",
            api_errors::paths_and_queries_that_do_not_parse_are_400_with_an_error_body,
        ),
        trial(
            "api_errors::values_out_of_range_are_refused_before_anything_changes",
            api_errors::values_out_of_range_are_refused_before_anything_changes,
        ),
        trial("api_security::missing_or_wrong_token_is_401", api_security::missing_or_wrong_token_is_401),
        trial("api_security::foreign_or_missing_host_is_403", api_security::foreign_or_missing_host_is_403),
        trial("api_security::foreign_origin_on_post_is_403", api_security::foreign_origin_on_post_is_403),
        trial(
            "api_security::foreign_origin_on_websocket_upgrade_is_403",
            api_security::foreign_origin_on_websocket_upgrade_is_403,
        ),
        trial(
            "api_security::openapi_document_lists_every_route",
            api_security::openapi_document_lists_every_route,
        ),
        trial(
            "events::websocket_streams_snapshot_refreshes_and_stopping",
            events::websocket_streams_snapshot_refreshes_and_stopping,
        ),
        trial("cli::help_lists_every_command", cli::help_lists_every_command),
        sandboxed(
            "cli::files_the_owner_names_are_regular_and_bounded",
            cli::files_the_owner_names_are_regular_and_bounded,
        ),
        sandboxed(
            "cli::a_local_run_shows_escape_sequences_on_a_terminal",
            cli::a_local_run_shows_escape_sequences_on_a_terminal,
        ),
        trial(
            "cli::a_local_job_larger_than_the_machine_is_refused_with_its_size",
            cli::a_local_job_larger_than_the_machine_is_refused_with_its_size,
        ),
        trial("cli::status_from_the_cli_uses_the_token", cli::status_from_the_cli_uses_the_token),
        trial("cli::no_daemon_is_one_clear_line", cli::no_daemon_is_one_clear_line),
        trial("cli::wrong_token_is_one_clear_line", cli::wrong_token_is_one_clear_line),
        trial("cli::a_missing_file_is_named_once", cli::a_missing_file_is_named_once),
        trial("cli::a_closed_stdout_ends_quietly", cli::a_closed_stdout_ends_quietly),
        trial(
            "cli::a_module_that_is_not_wasm_is_one_line_here_and_in_the_daemon",
            cli::a_module_that_is_not_wasm_is_one_line_here_and_in_the_daemon,
        ),
        trial("resources::json_agrees_with_the_kernel", resources::json_agrees_with_the_kernel),
        trial("resources::daemon_serves_the_same_machine", resources::daemon_serves_the_same_machine),
        trial_if(
            "resources::live_nvml_agrees_with_nvidia_smi",
            resources::live_nvml_agrees_with_nvidia_smi,
            gpu,
            "no NVIDIA GPU with a working driver on this machine (`nvidia-smi -L` lists none)",
        ),
        sandboxed(
            "jobs::wasi_job_reads_an_input_and_writes_an_output",
            jobs::wasi_job_reads_an_input_and_writes_an_output,
        ),
        sandboxed(
            "jobs::native_job_reads_an_input_and_writes_an_output",
            jobs::native_job_reads_an_input_and_writes_an_output,
        ),
        sandboxed("jobs::native_job_runs_in_a_rootfs_tar", jobs::native_job_runs_in_a_rootfs_tar),
        sandboxed(
            "jobs::native_job_runs_in_an_oci_image_with_whiteouts",
            jobs::native_job_runs_in_an_oci_image_with_whiteouts,
        ),
        sandboxed(
            "images::native_job_takes_what_its_spec_leaves_from_the_image_config",
            images::native_job_takes_what_its_spec_leaves_from_the_image_config,
        ),
        sandboxed(
            "images::an_image_whose_layer_does_not_match_its_digest_runs_nothing",
            images::an_image_whose_layer_does_not_match_its_digest_runs_nothing,
        ),
        trial("images::the_pytorch_example_is_a_valid_spec", images::the_pytorch_example_is_a_valid_spec),
        sandboxed(
            "images::a_provider_receives_and_unpacks_an_image_once",
            images::a_provider_receives_and_unpacks_an_image_once,
        ),
        trial(
            "jobs::malformed_spec_names_the_field_and_runs_nothing",
            jobs::malformed_spec_names_the_field_and_runs_nothing,
        ),
        sandboxed(
            "jobs::wasi_time_limit_stops_a_spinning_module",
            jobs::wasi_time_limit_stops_a_spinning_module,
        ),
        sandboxed("jobs::wasi_memory_limit_refuses_growth", jobs::wasi_memory_limit_refuses_growth),
        trial("jobs::a_module_that_is_not_wasm_fails_clearly", jobs::a_module_that_is_not_wasm_fails_clearly),
        sandboxed(
            "jobs::pause_freezes_every_thread_and_resume_continues",
            jobs::pause_freezes_every_thread_and_resume_continues,
        ),
        sandboxed(
            "daemon_jobs::daemon_runs_a_job_records_it_and_streams_its_life",
            daemon_jobs::daemon_runs_a_job_records_it_and_streams_its_life,
        ),
        sandboxed(
            "follow::job_logs_follow_prints_later_output_and_ends_with_the_job",
            follow::job_logs_follow_prints_later_output_and_ends_with_the_job,
        ),
        sandboxed(
            "follow::submit_wait_and_remote_logs_follow_end_with_the_remote_job",
            follow::submit_wait_and_remote_logs_follow_end_with_the_remote_job,
        ),
        sandboxed(
            "follow::a_job_submitted_before_any_provider_shares_runs_once_one_appears",
            follow::a_job_submitted_before_any_provider_shares_runs_once_one_appears,
        ),
        sandboxed(
            "daemon_jobs::pause_resume_and_cancel_from_the_cli",
            daemon_jobs::pause_resume_and_cancel_from_the_cli,
        ),
        sandboxed(
            "daemon_jobs::a_crash_leaves_no_job_running_and_the_record_says_so",
            daemon_jobs::a_crash_leaves_no_job_running_and_the_record_says_so,
        ),
        sandboxed(
            "daemon_jobs::a_job_frozen_when_its_agent_died_is_swept_by_the_next_start",
            daemon_jobs::a_job_frozen_when_its_agent_died_is_swept_by_the_next_start,
        ),
        sandboxed(
            "daemon_jobs::the_next_start_cleans_what_a_killed_run_left_before_it_is_ready",
            daemon_jobs::the_next_start_cleans_what_a_killed_run_left_before_it_is_ready,
        ),
        sandboxed(
            "escape::an_image_cannot_bring_host_folders_in",
            escape::an_image_cannot_bring_host_folders_in,
        ),
        sandboxed("escape::outputs_lose_setuid_bits", escape::outputs_lose_setuid_bits),
        sandboxed("escape::owner_files_are_not_there", escape::owner_files_are_not_there),
        sandboxed("escape::writes_outside_out_fail", escape::writes_outside_out_fail),
        sandboxed(
            "escape::disk_limit_stops_one_big_file_and_many_small_ones",
            escape::disk_limit_stops_one_big_file_and_many_small_ones,
        ),
        sandboxed(
            "escape::no_network_reaches_the_agent_or_anywhere",
            escape::no_network_reaches_the_agent_or_anywhere,
        ),
        sandboxed("escape::fork_bomb_stops_at_the_pid_limit", escape::fork_bomb_stops_at_the_pid_limit),
        sandboxed(
            "escape::memory_balloon_is_killed_inside_its_cgroup",
            escape::memory_balloon_is_killed_inside_its_cgroup,
        ),
        sandboxed(
            "escape::double_forked_children_do_not_outlive_cancel",
            escape::double_forked_children_do_not_outlive_cancel,
        ),
        sandboxed(
            "escape::the_agents_death_takes_every_job_process",
            escape::the_agents_death_takes_every_job_process,
        ),
        sandboxed("escape::terminal_injection_is_refused", escape::terminal_injection_is_refused),
        sandboxed("escape::ptrace_of_a_host_process_is_refused", escape::ptrace_of_a_host_process_is_refused),
        sandboxed("escape::mknod_mount_and_setuid_give_nothing", escape::mknod_mount_and_setuid_give_nothing),
        sandboxed("escape::only_stdio_fds_and_no_kernel_files", escape::only_stdio_fds_and_no_kernel_files),
        trial_if(
            "jobs::a_granted_gpu_is_the_only_one_the_job_sees",
            jobs::a_granted_gpu_is_the_only_one_the_job_sees,
            gpu && sandbox.is_ok(),
            "no NVIDIA GPU with a working driver on this machine (`nvidia-smi -L` lists none), or no sandbox",
        ),
        sandboxed(
            "availability::owner_pause_freezes_the_job_and_resume_runs_it_again",
            availability::owner_pause_freezes_the_job_and_resume_runs_it_again,
        ),
        sandboxed(
            "availability::a_closing_window_freezes_the_job_without_a_command",
            availability::a_closing_window_freezes_the_job_without_a_command,
        ),
        sandboxed(
            "availability::a_long_pause_stops_the_job_with_the_owners_reason",
            availability::a_long_pause_stops_the_job_with_the_owners_reason,
        ),
        trial(
            "availability::policy_is_shown_and_a_bad_one_is_refused_whole",
            availability::policy_is_shown_and_a_bad_one_is_refused_whole,
        ),
        trial(
            "network::three_agents_meet_through_one_bootstrap_and_find_a_restarted_one",
            network::three_agents_meet_through_one_bootstrap_and_find_a_restarted_one,
        ),
        trial("network::a_paused_agent_says_so_in_its_advert", network::a_paused_agent_says_so_in_its_advert),
        trial(
            "network::bad_adverts_are_rejected_and_not_forwarded_to_a_third_agent",
            network::bad_adverts_are_rejected_and_not_forwarded_to_a_third_agent,
        ),
        trial_if(
            "protocol::a_verifier_written_from_the_protocol_doc_checks_adverts",
            protocol::a_verifier_written_from_the_protocol_doc_checks_adverts,
            python,
            "python3 is not installed (scripts/setup.sh installs it for the tests)",
        ),
        trial_if(
            "protocol::the_offers_an_agent_lists_verify_with_the_documented_steps",
            protocol::the_offers_an_agent_lists_verify_with_the_documented_steps,
            python,
            "python3 is not installed (scripts/setup.sh installs it for the tests)",
        ),
        trial_if(
            "protocol::the_advert_test_vectors_in_the_protocol_doc_are_what_hearth_signs",
            protocol::the_advert_test_vectors_in_the_protocol_doc_are_what_hearth_signs,
            python,
            "python3 is not installed (scripts/setup.sh installs it for the tests)",
        ),
        trial_if(
            "protocol::a_verifier_written_from_the_ledger_doc_checks_an_export",
            protocol::a_verifier_written_from_the_ledger_doc_checks_an_export,
            python,
            "python3 is not installed (scripts/setup.sh installs it for the tests)",
        ),
        trial(
            "transfer::a_blob_and_a_folder_of_many_files_arrive_byte_identical_once",
            transfer::a_blob_and_a_folder_of_many_files_arrive_byte_identical_once,
        ),
        trial(
            "transfer::a_receiver_killed_half_way_resumes_and_refetches_at_most_two_chunks",
            transfer::a_receiver_killed_half_way_resumes_and_refetches_at_most_two_chunks,
        ),
        trial(
            "transfer::a_chunk_corrupted_on_the_senders_disk_never_lands",
            transfer::a_chunk_corrupted_on_the_senders_disk_never_lands,
        ),
        trial(
            "transfer::a_vanished_sender_gives_a_clear_error_and_cancel_is_clean",
            transfer::a_vanished_sender_gives_a_clear_error_and_cancel_is_clean,
        ),
        trial(
            "wire::every_blob_answer_ends_with_a_clean_close",
            wire::every_blob_answer_ends_with_a_clean_close,
        ),
        trial(
            "browser_session::a_login_link_signs_a_browser_in_once_and_the_cookie_opens_the_api_and_events",
            browser_session::a_login_link_signs_a_browser_in_once_and_the_cookie_opens_the_api_and_events,
        ),
        trial(
            "layers::dependencies_point_down_the_layers_and_the_map_shows_them",
            layers::dependencies_point_down_the_layers_and_the_map_shows_them,
        ),
        trial("layers::the_client_crate_links_no_engine", layers::the_client_crate_links_no_engine),
        trial(
            "hostile_clocks::extreme_clock_fields_are_refused_without_a_panic",
            hostile_clocks::extreme_clock_fields_are_refused_without_a_panic,
        ),
        trial(
            "hostile_market::tampered_and_unsigned_documents_are_rejected",
            hostile_market::tampered_and_unsigned_documents_are_rejected,
        ),
        sandboxed(
            "gpu_market::a_gpu_job_is_matched_granted_by_uuid_paused_alone_and_metered",
            gpu_market::a_gpu_job_is_matched_granted_by_uuid_paused_alone_and_metered,
        ),
        sandboxed(
            "market::a_job_runs_on_the_provider_it_fits_best_and_its_outputs_come_home",
            market::a_job_runs_on_the_provider_it_fits_best_and_its_outputs_come_home,
        ),
        sandboxed(
            "market::cancel_pause_and_a_vanished_provider_reach_the_consumer",
            market::cancel_pause_and_a_vanished_provider_reach_the_consumer,
        ),
        trial(
            "flood::a_flood_is_refused_memory_stays_bounded_and_an_honest_peer_gets_through",
            flood::a_flood_is_refused_memory_stays_bounded_and_an_honest_peer_gets_through,
        ),
        trial_if(
            "network::agents_behind_nats_reach_each_other_through_a_relay",
            network::agents_behind_nats_reach_each_other_through_a_relay,
            natted.is_ok(),
            natted.as_ref().err().map_or("", String::as_str),
        ),
        in_netns(
            "network::two_agents_on_one_lan_find_each_other_by_mdns",
            network::two_agents_on_one_lan_find_each_other_by_mdns,
        ),
        in_netns(
            "job_network::granted_network_reaches_the_internet_and_nothing_of_the_host",
            job_network::granted_network_reaches_the_internet_and_nothing_of_the_host,
        ),
        in_netns("job_network::network_is_off_unless_granted", job_network::network_is_off_unless_granted),
        in_netns(
            "hostile_jobs::only_dns_queries_reach_the_providers_resolver",
            hostile_jobs::only_dns_queries_reach_the_providers_resolver,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}
