//! The event catalog a customer reads: for every event type, its family, the guide's one-line
//! description and an example `data` object (`GET /v1/event-types`), and the example the test
//! tool sends.
//!
//! The built-in table covers the guide's 21 event types; the example of `visitor.checked_in` is
//! the guide's own body, the others follow its style (the same visitor, host and location
//! objects, RFC 3339 times). Names enter from the configured `events.catalog` (the registry's
//! list, in its order); a configured name the table does not know still appears, with a
//! generic description and example. Nothing here is stored or changes at run time.
//!
//! Each example is JSON text already in its `JSON.stringify` form, and `GET /v1/event-types`
//! serialises it straight from the table as a `RawValue`, so its key order survives
//! (`serde_json::Value` would sort the keys); the test tool sends the same text.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::model::event_family;

/// One built-in event type: name, the guide's description, example `data` (JSON text).
struct Entry {
    name: &'static str,
    description: &'static str,
    example: &'static str,
}

/// The guide's event types, in the guide's order.
const BUILT_IN: [Entry; 21] = [
    Entry {
        name: "visitor.checked_in",
        description: "A visitor has checked in",
        example: r#"{"visitor":{"id":"vis_abc123","first_name":"Jane","last_name":"Smith","email":"jane@example.com","company":"Acme Corp","purpose":"Meeting"},"host":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"check_in_time":"2025-01-15T09:30:00Z","badge_number":"V-0042","id_scanned":true,"nda_signed":true,"screening_status":"cleared"}"#,
    },
    Entry {
        name: "visitor.checked_out",
        description: "A visitor has checked out",
        example: r#"{"visitor":{"id":"vis_abc123","first_name":"Jane","last_name":"Smith","email":"jane@example.com","company":"Acme Corp"},"host":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"check_in_time":"2025-01-15T09:30:00Z","check_out_time":"2025-01-15T11:05:00Z","badge_number":"V-0042","badge_returned":true}"#,
    },
    Entry {
        name: "visitor.denied",
        description: "A visitor was denied entry",
        example: r#"{"visitor":{"id":"vis_def456","first_name":"Alex","last_name":"Brown","email":"alex@example.com","company":"Globex"},"host":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"denied_at":"2025-01-15T09:42:00Z","denied_by":{"id":"usr_abc111","name":"Front Desk"},"reason":"No valid ID presented"}"#,
    },
    Entry {
        name: "visitor.pre_registered",
        description: "A new pre-registration was created",
        example: r#"{"registration":{"id":"reg_ghi789","expected_arrival":"2025-01-16T14:00:00Z","purpose":"Interview"},"visitor":{"id":"vis_jkl012","first_name":"Maria","last_name":"Garcia","email":"maria@example.com","company":"Initech"},"host":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"created_at":"2025-01-15T09:30:00Z"}"#,
    },
    Entry {
        name: "visitor.pre_registration_cancelled",
        description: "A pre-registration was cancelled",
        example: r#"{"registration":{"id":"reg_ghi789","expected_arrival":"2025-01-16T14:00:00Z","purpose":"Interview"},"visitor":{"id":"vis_jkl012","first_name":"Maria","last_name":"Garcia","email":"maria@example.com","company":"Initech"},"host":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"cancelled_at":"2025-01-15T16:10:00Z","cancelled_by":{"id":"usr_xyz789","name":"John Doe"}}"#,
    },
    Entry {
        name: "visitor.updated",
        description: "A visitor record was modified",
        example: r#"{"visitor":{"id":"vis_abc123","first_name":"Jane","last_name":"Smith","email":"jane.smith@example.com","company":"Acme Corp"},"changed_fields":["email"],"updated_at":"2025-01-15T10:02:00Z","updated_by":{"id":"usr_abc111","name":"Front Desk"}}"#,
    },
    Entry {
        name: "visitor.deleted",
        description: "A visitor record was deleted",
        example: r#"{"visitor":{"id":"vis_abc123"},"deleted_at":"2025-01-15T18:00:00Z","deleted_by":{"id":"usr_adm001","name":"Site Admin"},"reason":"Data retention policy"}"#,
    },
    Entry {
        name: "screening.watchlist_hit",
        description: "A visitor matched a watchlist entry",
        example: r#"{"visitor":{"id":"vis_def456","first_name":"Alex","last_name":"Brown","company":"Globex"},"location":{"id":"loc_001","name":"Main Office"},"watchlist":{"id":"wl_001","name":"Internal Watchlist"},"match":{"entry_id":"wle_4471","score":0.92,"matched_fields":["first_name","last_name","date_of_birth"]},"matched_at":"2025-01-15T09:31:00Z","action":"hold_for_review"}"#,
    },
    Entry {
        name: "screening.bolo_alert",
        description: "A BOLO alert was triggered",
        example: r#"{"visitor":{"id":"vis_def456","first_name":"Alex","last_name":"Brown","company":"Globex"},"location":{"id":"loc_001","name":"Main Office"},"bolo":{"id":"bolo_017","title":"Trespass notice","issued_by":"Security Operations"},"triggered_at":"2025-01-15T09:31:00Z","notified":[{"id":"usr_sec001","name":"Security Desk"}]}"#,
    },
    Entry {
        name: "screening.cleared",
        description: "A visitor passed all screening checks",
        example: r#"{"visitor":{"id":"vis_abc123","first_name":"Jane","last_name":"Smith","company":"Acme Corp"},"location":{"id":"loc_001","name":"Main Office"},"checks":["watchlist","bolo","id_verification"],"cleared_at":"2025-01-15T09:29:00Z","screening_status":"cleared"}"#,
    },
    Entry {
        name: "emergency.lockdown_activated",
        description: "A lockdown was triggered",
        example: r#"{"emergency":{"id":"emg_5001","type":"lockdown","message":"Lockdown in effect. Stay in place and await instructions."},"location":{"id":"loc_001","name":"Main Office"},"triggered_by":{"id":"usr_sec001","name":"Security Desk"},"activated_at":"2025-01-15T13:12:00Z","visitors_on_site":14}"#,
    },
    Entry {
        name: "emergency.lockdown_deactivated",
        description: "A lockdown was lifted",
        example: r#"{"emergency":{"id":"emg_5001","type":"lockdown"},"location":{"id":"loc_001","name":"Main Office"},"deactivated_by":{"id":"usr_sec001","name":"Security Desk"},"activated_at":"2025-01-15T13:12:00Z","deactivated_at":"2025-01-15T13:47:00Z"}"#,
    },
    Entry {
        name: "emergency.evacuation_activated",
        description: "Evacuation mode was activated",
        example: r#"{"emergency":{"id":"emg_5002","type":"evacuation","message":"Evacuate the building using the nearest exit.","muster_point":"North parking lot"},"location":{"id":"loc_001","name":"Main Office"},"triggered_by":{"id":"usr_sec001","name":"Security Desk"},"activated_at":"2025-01-15T15:20:00Z","visitors_on_site":14}"#,
    },
    Entry {
        name: "document.nda_signed",
        description: "A visitor signed an NDA/waiver",
        example: r#"{"visitor":{"id":"vis_abc123","first_name":"Jane","last_name":"Smith","email":"jane@example.com","company":"Acme Corp"},"document":{"id":"doc_001","type":"nda","name":"Mutual NDA","version":"2024-03"},"location":{"id":"loc_001","name":"Main Office"},"signed_at":"2025-01-15T09:29:30Z"}"#,
    },
    Entry {
        name: "document.nda_declined",
        description: "A visitor declined to sign",
        example: r#"{"visitor":{"id":"vis_def456","first_name":"Alex","last_name":"Brown","email":"alex@example.com","company":"Globex"},"document":{"id":"doc_001","type":"nda","name":"Mutual NDA","version":"2024-03"},"location":{"id":"loc_001","name":"Main Office"},"declined_at":"2025-01-15T09:33:00Z"}"#,
    },
    Entry {
        name: "delivery.received",
        description: "A package was logged",
        example: r#"{"package":{"id":"pkg_001","carrier":"UPS","tracking_number":"1Z999AA10123456784","size":"medium"},"recipient":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"received_at":"2025-01-15T10:15:00Z","received_by":{"id":"usr_abc111","name":"Front Desk"}}"#,
    },
    Entry {
        name: "delivery.picked_up",
        description: "A package was picked up",
        example: r#"{"package":{"id":"pkg_001","carrier":"UPS","tracking_number":"1Z999AA10123456784"},"recipient":{"id":"usr_xyz789","name":"John Doe","department":"Engineering"},"location":{"id":"loc_001","name":"Main Office"},"received_at":"2025-01-15T10:15:00Z","picked_up_at":"2025-01-15T12:40:00Z"}"#,
    },
    Entry {
        name: "delivery.notified",
        description: "A recipient was notified about a delivery",
        example: r#"{"package":{"id":"pkg_001","carrier":"UPS","tracking_number":"1Z999AA10123456784"},"recipient":{"id":"usr_xyz789","name":"John Doe","email":"john.doe@example.com"},"location":{"id":"loc_001","name":"Main Office"},"channels":["email","sms"],"notified_at":"2025-01-15T10:16:00Z"}"#,
    },
    Entry {
        name: "user.login",
        description: "A team member logged in",
        example: r#"{"user":{"id":"usr_xyz789","name":"John Doe","email":"john.doe@example.com","role":"host"},"ip_address":"203.0.113.24","method":"sso","logged_in_at":"2025-01-15T08:55:00Z"}"#,
    },
    Entry {
        name: "user.login_failed",
        description: "A failed login attempt",
        example: r#"{"email":"john.doe@example.com","ip_address":"198.51.100.7","reason":"invalid_password","consecutive_failures":3,"attempted_at":"2025-01-15T08:54:10Z"}"#,
    },
    Entry {
        name: "settings.updated",
        description: "System settings were changed",
        example: r#"{"setting":{"key":"visitor.badge_expiry_hours","old_value":8,"new_value":12},"updated_by":{"id":"usr_adm001","name":"Site Admin"},"location":{"id":"loc_001","name":"Main Office"},"updated_at":"2025-01-15T17:20:00Z"}"#,
    },
];

/// The guide's event type names, in the guide's order: the default `events.catalog`
/// (`config::DEFAULT_EVENT_CATALOG`), taken from the table above so the names live in one place.
pub const GUIDE_EVENT_TYPES: [&str; 21] = {
    let mut names = [""; 21];
    let mut i = 0;
    while i < names.len() {
        names[i] = BUILT_IN[i].name;
        i += 1;
    }
    names
};

/// The example of a configured event type the built-in table does not know.
const GENERIC_EXAMPLE: &str = r#"{"id":"obj_abc123","location":{"id":"loc_001","name":"Main Office"},"occurred_at":"2025-01-15T09:30:00Z"}"#;

/// One event type as `GET /v1/event-types` shows it; `example` keeps its key order.
#[derive(Debug, Serialize)]
pub struct EventType<'a> {
    pub name: &'a str,
    pub family: &'a str,
    pub description: String,
    pub example: &'static RawValue,
}

fn built_in(name: &str) -> Option<&'static Entry> {
    BUILT_IN.iter().find(|e| e.name == name)
}

/// The example `data` of `name` (JSON text): what the test tool sends.
pub fn example_data(name: &str) -> &'static str {
    built_in(name).map_or(GENERIC_EXAMPLE, |e| e.example)
}

/// What the catalog says about `name`.
pub fn describe(name: &str) -> EventType<'_> {
    let family = event_family(name);
    let description = match built_in(name) {
        Some(e) => e.description.to_string(),
        None => format!("A {family} event (configured in events.catalog)"),
    };
    let example: &'static RawValue = serde_json::from_str(example_data(name))
        .expect("every built-in example is valid JSON (tested)");
    EventType {
        name,
        family,
        description,
        example,
    }
}

/// Every configured event type, in the configured order.
pub fn describe_all(names: &[String]) -> Vec<EventType<'_>> {
    names.iter().map(|n| describe(n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_EVENT_CATALOG;

    #[test]
    fn the_table_covers_the_guides_catalog_with_object_examples_in_canonical_form() {
        let names: Vec<&str> = BUILT_IN.iter().map(|e| e.name).collect();
        assert_eq!(names, DEFAULT_EVENT_CATALOG);
        for e in &BUILT_IN {
            let v: serde_json::Value = serde_json::from_str(e.example).unwrap();
            assert!(v.is_object(), "{}", e.name);
            // Sent as written: the JSON.stringify form ingest gives every `data`.
            assert_eq!(
                crate::canonical::canonical(e.example, 64).unwrap(),
                e.example
            );
            assert!(!e.description.is_empty());
        }
        assert_eq!(
            crate::canonical::canonical(GENERIC_EXAMPLE, 64).unwrap(),
            GENERIC_EXAMPLE
        );
    }

    #[test]
    fn the_guides_body_is_the_example_of_visitor_checked_in() {
        let guide: serde_json::Value = serde_json::json!({
            "visitor": {"id": "vis_abc123", "first_name": "Jane", "last_name": "Smith",
                        "email": "jane@example.com", "company": "Acme Corp", "purpose": "Meeting"},
            "host": {"id": "usr_xyz789", "name": "John Doe", "department": "Engineering"},
            "location": {"id": "loc_001", "name": "Main Office"},
            "check_in_time": "2025-01-15T09:30:00Z", "badge_number": "V-0042",
            "id_scanned": true, "nda_signed": true, "screening_status": "cleared"
        });
        let ours: serde_json::Value =
            serde_json::from_str(example_data("visitor.checked_in")).unwrap();
        assert_eq!(ours, guide);
        let t = describe("visitor.checked_in");
        assert_eq!(
            (t.family, t.description.as_str()),
            ("visitor", "A visitor has checked in")
        );
    }

    #[test]
    fn configured_types_outside_the_table_get_a_generic_entry() {
        let t = describe("parking.space_reserved");
        assert_eq!(t.family, "parking");
        assert!(t.description.contains("parking"), "{}", t.description);
        assert_eq!(t.example.get(), GENERIC_EXAMPLE);
        let shown = serde_json::to_string(&describe_all(&["user.login".into()])).unwrap();
        assert!(shown.starts_with(r#"[{"name":"user.login","family":"user","description":"A team member logged in","example":{"user":{"id":"usr_xyz789""#), "{shown}");
    }
}
