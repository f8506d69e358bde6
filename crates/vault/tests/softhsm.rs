//! The PKCS#11 KEK against a real SoftHSM2 token made for the test (`scripts/setup` installs
//! Debian's `softhsm2`; this test fails, never skips, without it).

use std::path::PathBuf;
use std::process::Command;

use vault::pkcs11::{Pkcs11Config, Pkcs11Kek};
use vault::*;

fn module() -> PathBuf {
    let candidates = [
        std::env::var("RTPAY_TEST_PKCS11_MODULE").unwrap_or_default(),
        "/usr/lib/softhsm/libsofthsm2.so".into(),
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so".into(),
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("SoftHSM2 is required: run scripts/setup (it installs Debian's softhsm2)")
}

/// A fresh token in its own directory; returns the directory.
fn token(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rtpay-softhsm-{}-{label}", std::process::id()));
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!("directories.tokendir = {}\nobjectstore.backend = file\n", dir.join("tokens").display()),
    )
    .unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label, "--so-pin", "12345678", "--pin", "87654321"])
        .output()
        .expect("softhsm2-util is required: run scripts/setup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

#[test]
fn the_kek_lives_in_the_token_and_wraps_there() {
    let dir = token("rtpay-test");
    let module = module();
    let config = Pkcs11Config { module: &module, token_label: "rtpay-test", pin: "87654321" };

    // Not there yet, and not asked to create it.
    assert_eq!(Pkcs11Kek::open(&config, 1, false).err(), Some(VaultError::UnknownKek(1)));
    let kek = Pkcs11Kek::open(&config, 1, true).unwrap();
    assert_eq!(kek.protection().unwrap(), (true, false), "sensitive and never extractable");
    let dek = Secret32::random().unwrap();
    let wrapped = kek.wrap(&dek).unwrap();
    assert_eq!(kek.unwrap(&wrapped).unwrap().expose(), dek.expose());
    assert_ne!(kek.wrap(&dek).unwrap(), wrapped, "a fresh IV each time");
    let mut bad = wrapped.clone();
    bad[20] ^= 1;
    assert_eq!(kek.unwrap(&bad).err(), Some(VaultError::Tampered));
    assert_eq!(kek.unwrap(&wrapped[..30]).err(), Some(VaultError::Tampered));
    assert_eq!(kek.unwrap(&wrapped).unwrap().expose(), dek.expose(), "the session still works");
    // The token forgets this process's login (as after an HSM's restart or a network HSM's lost
    // connection, the session no longer reaches the key): the key is found again on a new,
    // logged-in session, without a restart.
    let context = cryptoki::context::Pkcs11::new(&module).unwrap();
    match context.initialize(cryptoki::context::CInitializeArgs::OsThreads) {
        Ok(()) | Err(cryptoki::error::Error::AlreadyInitialized) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = context.get_slots_with_token().unwrap()[0];
    context.open_ro_session(slot).unwrap().logout().unwrap();
    // (Dropped, a context would finalize the library under the KEK's.)
    std::mem::forget(context);
    assert_eq!(kek.unwrap(&wrapped).unwrap().expose(), dek.expose(), "a new session after the old one was closed");
    assert_eq!(kek.unwrap(&kek.wrap(&dek).unwrap()).unwrap().expose(), dek.expose());
    assert_eq!(format!("{kek:?}"), "Pkcs11Kek(v1)");
    drop(kek);

    // The key persists in the token: a new session finds it and reads the old wrapping.
    let again = Pkcs11Kek::open(&config, 1, false).unwrap();
    assert_eq!(again.unwrap(&wrapped).unwrap().expose(), dek.expose());

    // Rotation from a file KEK to the token's: old data keys are re-wrapped, still the same key.
    let mut ring = Keyring::default();
    ring.add(Box::new(FileKek::new(1, Secret32::random().unwrap())));
    let (old_dek, old_wrapping) = ring.new_data_key().unwrap();
    let sealed = seal(&old_dek, b"holder-1", b"52998224725").unwrap();
    drop(again);
    ring.add(Box::new(Pkcs11Kek::open(&config, 2, true).unwrap()));
    let rewrapped = ring.rewrap(&old_wrapping).unwrap();
    assert_eq!(rewrapped.kek_version, 2);
    assert_eq!(open(&ring.unwrap(&rewrapped).unwrap(), b"holder-1", &sealed).unwrap(), b"52998224725");
    drop(ring);

    // A wrong PIN and a wrong token label are configuration errors that say so, without the PIN.
    let wrong = Pkcs11Config { pin: "00000000", ..config };
    let e = Pkcs11Kek::open(&wrong, 1, false).err().unwrap();
    assert_eq!(e, VaultError::Config("the PKCS#11 PIN is not correct".into()));
    let missing = Pkcs11Config { token_label: "nope", ..config };
    assert!(Pkcs11Kek::open(&missing, 1, false).err().unwrap().to_string().contains("no PKCS#11 token labelled"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_token_that_disappears_is_unavailable_not_tampering() {
    let dir = token("rtpay-gone");
    let module = module();
    let config = Pkcs11Config { module: &module, token_label: "rtpay-gone", pin: "87654321" };
    let kek = Pkcs11Kek::open(&config, 1, true).unwrap();
    let dek = Secret32::random().unwrap();
    let wrapped = kek.wrap(&dek).unwrap();
    // The token's storage goes away under the running session (a pulled HSM, a lost volume).
    std::fs::remove_dir_all(dir.join("tokens")).unwrap();
    let wrap = kek.wrap(&dek).err();
    let unwrap = kek.unwrap(&wrapped).err();
    assert!(matches!(wrap, Some(VaultError::Unavailable(_))), "{wrap:?}");
    assert!(matches!(unwrap, Some(VaultError::Unavailable(_))), "{unwrap:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// A key under a KEK's label that is not what rtpay makes (one that may leave the token), or two
/// keys under one label, are refused when opened, saying why.
#[test]
fn keys_a_token_holds_twice_or_lets_out_are_refused() {
    use cryptoki::context::{CInitializeArgs, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let dir = token("rtpay-odd");
    let module = module();
    let config = Pkcs11Config { module: &module, token_label: "rtpay-odd", pin: "87654321" };
    // The rtpay key of version 1, then keys made beside rtpay, as an operator's tool would.
    drop(Pkcs11Kek::open(&config, 1, true).unwrap());
    let context = Pkcs11::new(&module).unwrap();
    match context.initialize(CInitializeArgs::OsThreads) {
        Ok(()) | Err(cryptoki::error::Error::AlreadyInitialized) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = context
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| context.get_token_info(*s).unwrap().label().trim_end() == "rtpay-odd")
        .unwrap();
    let session = context.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::new("87654321".into()))) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let make = |label: &str, extractable: bool| {
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32usize.try_into().unwrap()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(!extractable),
                    Attribute::Extractable(extractable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ],
            )
            .unwrap()
    };
    make(&vault::pkcs11::key_label(1), false);
    make(&vault::pkcs11::key_label(2), true);
    let twice = Pkcs11Kek::open(&config, 1, false).err().unwrap().to_string();
    assert!(twice.contains("2 keys labelled \"rtpay-kek-v1\""), "{twice}");
    let out = Pkcs11Kek::open(&config, 2, false).err().unwrap().to_string();
    assert!(out.contains("is not an AES-256 key made in the token"), "{out}");
    drop(session);
    // (Dropped, a context would finalize the library under the vault's.)
    std::mem::forget(context);
    std::fs::remove_dir_all(dir).ok();
}
